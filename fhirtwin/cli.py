"""The ``fhirtwin`` command line."""

from __future__ import annotations

import sys
from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fhirtwin import heap
from fhirtwin.conversion import (
    Conversion,
    ConversionError,
    HL7ParseError,
    convert_hl7v2,
    validation_summary,
)
from fhirtwin.hl7v2 import split_batch
from fhirtwin.rules import MappingError

app = typer.Typer(
    help="fhirtwin: clinical data in (HL7 v2, …), FHIR R4 out.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


class Source(StrEnum):
    hl7v2 = "hl7v2"
    fhir = "fhir"
    csv = "csv"
    ccda = "ccda"
    note = "note"
    notes = "notes"  # the pipeline's name for the same source


@app.callback()
def _main() -> None:
    """FHIR-native interoperability middleware and digital-twin store."""


def _inputs(paths: list[str]) -> list[tuple[str, bytes]]:
    """(stem, message bytes) for every message of every input; batches get -N stems."""
    out: list[tuple[str, bytes]] = []
    for p in paths:
        if p == "-":
            data, stem = sys.stdin.buffer.read(), "stdin"
        else:
            path = Path(p)
            if path.is_dir():
                for child in sorted(path.iterdir()):
                    if child.is_file() and child.suffix.lower() in (".hl7", ".txt", ".msg"):
                        out.extend(_inputs([str(child)]))
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                err.print(f"[red]cannot read {p}: {exc.strerror}[/red]")
                raise typer.Exit(2) from None
            stem = path.stem
        messages = split_batch(data) or [data]
        if len(messages) == 1:
            out.append((stem, messages[0]))
        else:
            out.extend((f"{stem}-{i}", m) for i, m in enumerate(messages, 1))
    return out


@app.command()
def convert(
    inputs: Annotated[list[str], typer.Argument(help="Files, folders, or - for stdin.")],
    source: Annotated[Source, typer.Option("--from", help="Input format.")] = Source.hl7v2,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for <stem>.json (default: stdout).")
    ] = None,
    report: Annotated[
        bool, typer.Option("--report", help="Also write <stem>.report.json (the loss report).")
    ] = False,
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Check each Bundle against FHIR R4.")
    ] = True,
    mappings: Annotated[
        Path | None, typer.Option("--mappings", help="Rules folder (default: ./mappings).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="CSV profile in mappings/csv/ (e.g. synthea).")
    ] = None,
    patient: Annotated[
        str | None,
        typer.Option(
            "--patient",
            help="Notes: whom a plain-text note is about (Patient/<id> or system|value).",
        ),
    ] = None,
) -> None:
    """Convert messages to FHIR R4 Bundles: one <stem>.json per message."""
    if source != Source.hl7v2:
        kind = "notes" if source == Source.note else source.value
        if patient and kind != "notes":
            err.print("[red]--patient is for notes (--from note) only[/red]")
            raise typer.Exit(2)
        options = {"patient": patient} if patient else {}
        _convert_other(kind, inputs, out, validate=validate, profile=profile, **options)
        return
    messages = _inputs(inputs)
    to_stdout = out is None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    invalid = 0
    types: Counter[str] = Counter()
    lost = Counter[str]()
    progress = Progress(
        TextColumn("converting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=to_stdout or len(messages) < 2,
    )
    with progress:
        task = progress.add_task("convert", total=len(messages))
        for n, (stem, data) in enumerate(messages):
            if n == 1:
                heap.settle()  # the rules and models the first message needed are loaded
            try:
                conv = convert_hl7v2(data, validate=validate, mappings=mappings)
            except (HL7ParseError, ConversionError) as exc:
                failed += 1
                progress.console.print(f"[red]{stem}: {exc}[/red]")
                progress.advance(task)
                continue
            except MappingError as exc:
                err.print(f"[red]the rules are broken: {exc}[/red]")
                raise typer.Exit(3) from None
            _write(conv, stem, out, report)
            problems = conv.report.get("validation") or []
            if problems:
                invalid += 1
                progress.console.print(
                    f"[yellow]{escape(stem)}: {escape(validation_summary(conv.report))}[/yellow]"
                )
            types.update(conv.report["resources"])
            lost["unmapped segments"] += len(conv.report["unmapped_segments"])
            lost["unmapped fields"] += len(conv.report["unmapped_fields"])
            lost["untranslated codes"] += len(conv.report["untranslated_codes"])
            lost["assumptions"] += len(conv.report["assumptions"])
            lost["dropped invalid values"] += len(conv.report["errors"])
            progress.advance(task)
    if not to_stdout:
        _summary(len(messages), failed, invalid, types, lost, out, report, validate)
    if failed or invalid:
        raise typer.Exit(1)


def _convert_other(
    kind: str,
    inputs: list[str],
    out: Path | None,
    *,
    validate: bool,
    profile: str | None,
    **options: str,
) -> None:
    """Other sources live in their own modules (fhirtwin.normalize.PLUGINS), each with a
    ``convert_paths(inputs, out, *, validate, profile, console, **options) -> exit code``;
    ``options`` are the kind's own (notes: ``patient``). A missing input is refused here,
    once for every kind."""
    import importlib

    from fhirtwin.normalize import PLUGINS

    missing = [p for p in inputs if p != "-" and not Path(p).exists()]
    if missing:
        err.print(f"[red]cannot read {missing[0]}: no such file or folder[/red]")
        raise typer.Exit(2)
    try:
        module = importlib.import_module(PLUGINS[kind])
    except ModuleNotFoundError:
        err.print(f"[red]converting from {kind} is not available yet[/red]")
        raise typer.Exit(2) from None
    heap.settle()  # the converter and the models it validates with are loaded
    code = module.convert_paths(
        inputs, out, validate=validate, profile=profile, console=err, **options
    )
    if code:
        raise typer.Exit(code)


def _write(conv: Conversion, stem: str, out: Path | None, report: bool) -> None:
    data = orjson.dumps(conv.bundle, option=orjson.OPT_INDENT_2)
    if out is None:
        sys.stdout.buffer.write(data + b"\n")
        if report:
            err.print_json(orjson.dumps(conv.report).decode())
        return
    (out / f"{stem}.json").write_bytes(data)
    if report:
        (out / f"{stem}.report.json").write_bytes(
            orjson.dumps(conv.report, option=orjson.OPT_INDENT_2)
        )


def _summary(
    total: int,
    failed: int,
    invalid: int,
    types: Counter[str],
    lost: Counter[str],
    out: Path | None,
    report: bool,
    validate: bool,
) -> None:
    console = Console()
    console.print(f"{total - failed} of {total} messages converted → {out}")
    table = Table()
    table.add_column("resource type")
    table.add_column("count", justify="right")
    for rt, n in sorted(types.items(), key=lambda x: (-x[1], x[0])):
        table.add_row(rt, str(n))
    table.add_row("[bold]all[/bold]", f"[bold]{sum(types.values())}[/bold]")
    console.print(table)
    console.print(
        "loss report: "
        + ", ".join(f"{k} {v}" for k, v in lost.items())
        + (" (details in <stem>.report.json)" if report else " (add --report for details)")
    )
    if validate:
        console.print(
            f"FHIR R4 validation: {total - failed - invalid} valid, {invalid} with problems"
        )
    if failed:
        console.print(f"[red]{failed} message(s) could not be converted (see above)[/red]")


from fhirtwin.cli_api import register as register_api  # noqa: E402
from fhirtwin.cli_audit import register as register_audit  # noqa: E402
from fhirtwin.cli_auth import register as register_auth  # noqa: E402
from fhirtwin.cli_consent import register as register_consent  # noqa: E402
from fhirtwin.cli_keys import register as register_keys  # noqa: E402
from fhirtwin.cli_pipeline import register  # noqa: E402  (after `app` exists)
from fhirtwin.cli_results import register as register_results  # noqa: E402
from fhirtwin.cli_subscribers import register as register_subscribers  # noqa: E402

register(app)
register_consent(app)
register_subscribers(app)
register_audit(app)
register_results(app)
register_auth(app)
register_keys(app)
register_api(app)


def main() -> None:
    """The ``fhirtwin`` command: this process is fhirtwin's, so its heap may be settled."""
    heap.enable()
    app()


if __name__ == "__main__":
    main()
