# syntax=docker/dockerfile:1
# fhirtwin: one image for every part (MLLP listener, workers, API); the Helm chart picks the
# part with the container's args (`fhirtwin mllp`, `fhirtwin worker normalize …`, `fhirtwin api`).
# Build: docker build -t REGISTRY/fhirtwin:0.1.0 .   (docs/deploy.md)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtualenv with fhirtwin and its pinned dependencies (all binary wheels) ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# dependencies first (a layer that changes only with pyproject.toml)
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --only-binary=:all: -r /tmp/requirements.txt
# then the code, installed in place so that the rules folders sit beside the package
# (fhirtwin finds mappings/ and nlp/ next to it, as in a development checkout)
COPY fhirtwin ./fhirtwin
COPY mappings ./mappings
COPY nlp ./nlp
RUN pip install --no-deps -e . \
    && python -m compileall -q /app/fhirtwin \
    && fhirtwin --help >/dev/null

# -- runtime: the virtualenv and the app, no compilers, no pip cache, a non-root user -------
FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid ${UID} fhirtwin \
    && useradd --system --uid ${UID} --gid ${UID} --home-dir /tmp/fhirtwin --no-create-home \
       --shell /usr/sbin/nologin fhirtwin
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FHIRTWIN_HOME=/tmp/fhirtwin \
    FHIRTWIN_MAPPINGS=/app/mappings \
    FHIRTWIN_NLP=/app/nlp \
    FHIRTWIN_LOG_FORMAT=json \
    FHIRTWIN_METRICS_ADDR=0.0.0.0
WORKDIR /app
USER 10001:10001
EXPOSE 2575 8080 9090
ENTRYPOINT ["fhirtwin"]
CMD ["--help"]
