"""The twin store: one longitudinal record per patient, materialized in Redis.

Every key of a twin shares the Redis Cluster hash tag ``{<twin id>}``:

==========================  =====  ==========================================================
key                         type   content
==========================  =====  ==========================================================
``ft:{T}:cur``              hash   ``Type/id`` → current resource JSON, sealed
``ft:{T}:ver``              hash   ``Type/id`` → order key of the current version (see below)
``ft:{T}:vers``             hash   ``Type/id|hash`` → JSON of every version ever seen, sealed
``ft:{T}:vinfo``            hash   ``Type/id|hash`` → ``event ms|known ms|topic/partition/offset``
                                   (and ``Type/id|hash|event ms``: that content sent again,
                                   or by another record at the same event time)
``ft:{T}:hist``             zset   the same keys, scored by the time fhirtwin first knew them
``ft:{T}:tl``               zset   ``Type/id`` scored by clinical time (the timeline)
``ft:{T}:set:<name>``       set    derived state: problems, medications, allergies
``ft:{T}:latest:<name>``    hash   derived state: vitals / labs, code → ``clinical ms|Type/id``
``ft:{T}:ids``              hash   blind index → patient identifier (``system|value``), sealed
``ft:{T}:links``            list   identity decisions (JSON, sealed), newest first
``ft:{T}:meta``             hash   created/updated times, Kafka offsets applied, merged_into,
                                   ``gen`` (bumped by every apply that changes ``cur``)
``ft:{T}:merges``           hash   twin merged into T → what undoing it needs (identifiers,
                                   the merge's record), sealed
``ft:{T}:origin``           hash   ``topic/partition/offset`` of a record that came from a
                                   twin merged into T → that twin (what an unmerge gives back)
``ft:{T}:retracted``        hash   assertion key (as in ``:vinfo``) → when an unmerge took it
                                   out of T (kept for history; no longer T's)
``ft:{T}:erased``           string the tombstone an erasure leaves (no other key of T remains)
==========================  =====  ==========================================================

**Encryption at rest** (``fhirtwin/crypto.py``): every value marked *sealed* is AES-256-GCM
under the twin's own data key, with associated data ``<twin>|<Type/id>|<hash>`` for resource
versions (``<twin>|ids``, ``<twin>|links`` for the others), so a ciphertext moved to another
field or twin does not open. Lookup keys hold no identifier in clear: ``ft:id:<blind>`` and
``ft:idv:<blind>`` are keyed hashes of ``system|value`` and of the bare value.

Global keys: ``ft:twins`` (set of live twin ids), ``ft:id:<blind(system|value)>`` and
``ft:idv:<blind(value)>`` (identifier → twin id), which the MPI owns, and
``ft:ref:<Type/id>`` (set of the twins that have held that
resource; the FHIR API's read by id). On a single server the apply script writes the
reference index and the list of twins in the same atomic step as the twin, for the refs
it changed and the twin it created; on a Redis Cluster the client sends them after each
apply (an idempotent ``SADD`` per resource). The index may name a twin since merged away
(readers follow ``merged_into``) or several twins (a Practitioner in two patients'
messages): readers check each twin's ``cur`` hash, which stays the truth.

**Idempotence.** A version is identified by its content hash (``content_view``: without
``meta.source`` and the lineage extension, so a Practitioner or Location that every message
repeats unchanged keeps one version instead of one a message; its lineage stays that of the
message that first sent it, and each message's Provenance still names it). The *order key*
of a version is its event time (the source message's time, zero-padded ms) followed by its
hash; the current version of a resource is the one with the greatest order key (a content
sent again carries its order forward). That order is total
and does not depend on delivery order, so redelivery, replay, or two workers racing give
the same twin, and an older version never overwrites a newer one. One Lua script applies
all resources of one event atomically; its cost depends on the number of resources in the
event, never on the size of the twin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from fhirtwin.crypto import ErasedError, KeyRing, default_keyring
from fhirtwin.redisconn import RedisClient, connect, is_cluster

__all__ = [
    "TWIN_SUFFIXES",
    "AppliedEvent",
    "TwinStore",
    "UnmergeError",
    "UnmergeNotFound",
    "Write",
    "clinical_time_ms",
    "content_hash",
    "fhir_time_ms",
    "follow_merges",
    "follow_merges_many",
    "state_op",
]

# Derived-state categories.
STATE_SETS = ("problems", "medications", "allergies")
STATE_LATEST = ("vitals", "labs")
# Every key of a twin but its tombstone (``ft:{T}:<suffix>``).
TWIN_SUFFIXES = (
    "cur",
    "ver",
    "vers",
    "vinfo",
    "hist",
    "tl",
    "ids",
    "links",
    "meta",
    "merges",
    "origin",
    "retracted",
    "need",
    *(f"set:{n}" for n in STATE_SETS),
    *(f"latest:{n}" for n in STATE_LATEST),
)

VITAL_LOINC = {
    "85354-9",  # blood pressure panel
    "8480-6",  # systolic
    "8462-4",  # diastolic
    "8867-4",  # heart rate
    "9279-1",  # respiratory rate
    "8310-5",  # body temperature
    "59408-5",  # SpO2 by pulse oximetry
    "2708-6",  # SaO2
    "29463-7",  # body weight
    "8302-2",  # body height
    "39156-5",  # BMI
    "8287-5",  # head circumference
}


# The converters' lineage extension (fhirtwin.mapping.LINEAGE_EXTENSION; not imported, to
# keep the store free of the mapping engine: tests/test_twin_store.py checks they agree).
LINEAGE_URL = "https://fhirtwin.dev/fhir/StructureDefinition/source-segment"
_NOT_CONTENT = ("versionId", "lastUpdated", "source")


def content_view(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without what says where and when it was sent rather than what it says:
    ``meta.versionId`` and ``meta.lastUpdated`` (the store sets them), ``meta.source`` (the
    message that sent it) and the lineage extension (that message's segments)."""
    # Runs for every resource of every event the assembler applies: plain membership tests
    # and a loop rather than generator expressions (on the e2e feed's resources, 1.3-1.4 µs
    # a resource instead of 1.9-2.3).
    out = resource
    meta = resource.get("meta")
    if type(meta) is dict and ("source" in meta or "versionId" in meta or "lastUpdated" in meta):
        out = dict(resource)
        kept = {k: v for k, v in meta.items() if k not in _NOT_CONTENT}
        if kept:
            out["meta"] = kept
        else:
            del out["meta"]
    exts = resource.get("extension")
    if type(exts) is list:
        for e in exts:
            if type(e) is dict and e.get("url") == LINEAGE_URL:
                break
        else:
            return out
        if out is resource:
            out = dict(resource)
        rest = [e for e in exts if not (type(e) is dict and e.get("url") == LINEAGE_URL)]
        if rest:
            out["extension"] = rest
        else:
            del out["extension"]
    return out


def content_hash(resource: dict[str, Any]) -> str:
    """128-bit hex digest of the resource's content (``content_view``) as canonical JSON
    (keys sorted): the same for the same resource sent again by another message."""
    view = content_view(resource)
    return hashlib.sha256(orjson.dumps(view, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def fhir_time_ms(value: Any) -> int | None:
    """FHIR date / dateTime / instant (any precision) → epoch ms, UTC; None if unreadable.

    A partial date means its first instant; a time without zone is read as UTC.
    """
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) == 4:
            dt = datetime(int(value), 1, 1, tzinfo=UTC)
        elif len(value) == 7:
            dt = datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
        elif len(value) == 10:
            dt = datetime(int(value[:4]), int(value[5:7]), int(value[8:10]), tzinfo=UTC)
        else:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(dt.timestamp() * 1000)


_CLINICAL_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Encounter": (("period", "start"),),
    "Observation": (
        ("effectiveDateTime",),
        ("effectivePeriod", "start"),
        ("effectiveInstant",),
        ("issued",),
    ),
    "DiagnosticReport": (("effectiveDateTime",), ("effectivePeriod", "start"), ("issued",)),
    "Condition": (("onsetDateTime",), ("onsetPeriod", "start"), ("recordedDate",)),
    "Procedure": (("performedDateTime",), ("performedPeriod", "start")),
    "Immunization": (("occurrenceDateTime",), ("recorded",)),
    "MedicationRequest": (("authoredOn",),),
    "MedicationAdministration": (("effectiveDateTime",), ("effectivePeriod", "start")),
    "MedicationDispense": (("whenHandedOver",), ("whenPrepared",)),
    "MedicationStatement": (
        ("effectiveDateTime",),
        ("effectivePeriod", "start"),
        ("dateAsserted",),
    ),
    "AllergyIntolerance": (("onsetDateTime",), ("recordedDate",)),
    "ServiceRequest": (("occurrenceDateTime",), ("authoredOn",)),
    "Specimen": (("collection", "collectedDateTime"), ("receivedTime",)),
    "Appointment": (("start",),),
    "DocumentReference": (("date",),),
    "Composition": (("date",),),
    "CarePlan": (("period", "start"), ("created",)),
    "Claim": (("created",),),
    "ChargeItem": (("occurrenceDateTime",), ("enteredDate",)),
    "FamilyMemberHistory": (("date",),),
    "ImagingStudy": (("started",),),
    "EpisodeOfCare": (("period", "start"),),
    "Goal": (("startDate",),),
}


def clinical_time_ms(resource: dict[str, Any]) -> int | None:
    """When it happened clinically (not when it was sent), for the timeline."""
    for path in _CLINICAL_PATHS.get(resource.get("resourceType", ""), ()):
        value: Any = resource
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        ms = fhir_time_ms(value)
        if ms is not None:
            return ms
    return None


def _codes(concept: Any) -> list[str]:
    if not isinstance(concept, dict):
        return []
    return [c.get("code", "") for c in concept.get("coding", ()) if isinstance(c, dict)]


def _first_code(concept: Any) -> str:
    if isinstance(concept, dict):
        for c in concept.get("coding", ()):
            if isinstance(c, dict) and c.get("code"):
                return f"{c.get('system', '')}|{c['code']}"
        if concept.get("text"):
            return f"text|{concept['text']}"
    return ""


def state_op(resource: dict[str, Any]) -> str:
    """How this version of a resource changes the derived state, as one op for the script.

    ``set:<name>:+`` / ``set:<name>:-`` add or remove the resource from a state set;
    ``latest:<name>:+:<code>`` / ``latest:<name>:-:<code>`` make it (or stop it being) the
    latest of its code. ``""`` when the resource plays no part in the summary.
    """
    rtype = resource.get("resourceType")
    if rtype == "Condition":
        clinical = _codes(resource.get("clinicalStatus"))
        verification = _codes(resource.get("verificationStatus"))
        bad = {"refuted", "entered-in-error"}
        active = (
            not clinical or bool({"active", "recurrence", "relapse"} & set(clinical))
        ) and not (bad & set(verification))
        return "set:problems:" + ("+" if active else "-")
    if rtype in ("MedicationRequest", "MedicationStatement"):
        active = resource.get("status") in ("active", "on-hold", "intended")
        return "set:medications:" + ("+" if active else "-")
    if rtype == "AllergyIntolerance":
        clinical = _codes(resource.get("clinicalStatus"))
        verification = _codes(resource.get("verificationStatus"))
        active = (not clinical or "active" in clinical) and not (
            {"refuted", "entered-in-error"} & set(verification)
        )
        return "set:allergies:" + ("+" if active else "-")
    if rtype == "Observation":
        code = _first_code(resource.get("code"))
        if not code:
            return ""
        cats = {c for cat in resource.get("category", ()) for c in _codes(cat)}
        loinc = {c for c in _codes(resource.get("code"))}
        if "vital-signs" in cats or loinc & VITAL_LOINC:
            name = "vitals"
        elif cats & {"social-history", "survey", "sdoh"} or (
            not any(k.startswith("value") for k in resource) and "component" not in resource
        ):
            return ""
        else:
            name = "labs"
        valid = resource.get("status") not in ("entered-in-error", "cancelled")
        return f"latest:{name}:{'+' if valid else '-'}:{code}"
    return ""


# A deletion is a version too: its "hash" is DELETED_MARK + the event time, so it is unique
# per deletion and, "g" sorting after every hex digit, wins a tie with a version of the same
# event time; a version with a later event time still wins over it.
DELETED_MARK = "g"


def deletion_hash(event_ms: int) -> str:
    return f"{DELETED_MARK}{_evt15(event_ms)}{'0' * 16}"


# The script applies one event: every resource version in it, in one atomic step.
# KEYS[1] = "ft:{T}" (all other keys of the twin derive from it: one hash tag, one slot).
# ARGV: knowms, evt15, src, offset field, offset, n, then 5 per resource:
#       ref, hash, json, clinical ms ("" if none), state op ("" if none);
#       then m, then 3 per deletion: ref, deletion hash, sealed marker; then the mode and
#       the index mode. On a single server it also writes ``ft:twins`` and ``ft:ref:*``,
#       keys it does not declare (as ``_INDEX`` does); on a cluster the client does.
_APPLY = r"""
local base = KEYS[1]
if redis.call('EXISTS', base .. ':erased') == 1 then return {'erased'} end
local merged = redis.call('HGET', base .. ':meta', 'merged_into')
if merged then return {'merged', merged} end
local know, evt15, src = ARGV[1], ARGV[2], ARGV[3]
local n = tonumber(ARGV[6])
local d0 = 7 + n * 5
local m = tonumber(ARGV[d0] or '0') or 0
-- A body sent as '' is one the client saw this twin hold (ref|hash in :vers): it is not
-- sealed and sent again. Mode '1' (a pipelined batch, in order) and '2' (one event) check
-- that it is still held before writing anything, else answer 'need' (the client sends the
-- event again with every body). In mode '1' a 'need' leaves the :need marker, so the
-- batch's later events of this twin also wait, to be applied in order after it.
local mode = ARGV[d0 + 1 + m * 3] or '0'
-- Index mode (the argument after it): 't' a twin, 's' the shared twin (no patient), ''
-- none (a Redis Cluster, where the client writes the index, or an unmerge's staging keys).
local index = ARGV[d0 + 2 + m * 3] or ''
if mode ~= '0' then
  if mode == '1' and redis.call('EXISTS', base .. ':need') == 1 then return {'need'} end
  for i = 0, n - 1 do
    local j = 7 + i * 5
    if ARGV[j+2] == '' and redis.call('HEXISTS', base .. ':vers', ARGV[j] .. '|' .. ARGV[j+1]) == 0 then
      if mode == '1' then redis.call('SET', base .. ':need', '1') end
      return {'need'}
    end
  end
end
-- Keep the version in the history. When this assertion is newer than the current one
-- (:ver), it becomes current, for a write or a deletion alike: the answer is then the body
-- to store as current, or false when the content stays the same (another message sending
-- the resource again: no new version, only a later event time, so that an older version
-- arriving late cannot overtake it). A content held before and asserted again is kept as
-- an assertion (Type/id|hash|event in :vinfo and :hist, no second body) for as_of and
-- history. :ver's known time (lastUpdated) is when the content became current.
local function becomes_current(ref, h, body)
  local vkey = ref .. '|' .. h
  local fresh = body ~= '' and redis.call('HSETNX', base .. ':vers', vkey, body) == 1
  if fresh then
    redis.call('HSET', base .. ':vinfo', vkey, evt15 .. '|' .. know .. '|' .. src)
    redis.call('ZADD', base .. ':hist', know, vkey)
  end
  local order = evt15 .. h
  local cur = redis.call('HGET', base .. ':ver', ref)
  if cur and string.sub(cur, 1, 47) > order then return false end
  if cur and string.sub(cur, 1, 47) == order then
    -- The same content at the same event time, from another record (one clinician in
    -- two patients' messages of one minute): kept as an assertion of that record too, so
    -- an unmerge gives each twin its own. A redelivery (the same record) writes nothing.
    local first = redis.call('HGET', base .. ':vinfo', vkey)
    if first and string.match(first, '^[^|]*|[^|]*|(.*)$') ~= src then
      local akey = vkey .. '|' .. evt15
      if redis.call('HSETNX', base .. ':vinfo', akey, evt15 .. '|' .. string.sub(cur, 49) .. '|' .. src) == 1 then
        redis.call('ZADD', base .. ':hist', know, akey)
      end
    end
    return false
  end
  local same = cur and string.sub(cur, 16, 47) == h
  local since = know
  if same then since = string.sub(cur, 49) end
  if not fresh then
    local akey = vkey .. '|' .. evt15
    if redis.call('HSETNX', base .. ':vinfo', akey, evt15 .. '|' .. since .. '|' .. src) == 1 then
      redis.call('ZADD', base .. ':hist', know, akey)
    end
  end
  redis.call('HSET', base .. ':ver', ref, order .. '|' .. since)
  if same then return false end
  if fresh then return body end
  return redis.call('HGET', base .. ':vers', vkey)
end
local changed = {}
for i = 0, n - 1 do
  local j = 7 + i * 5
  local ref, h, body, clin, op = ARGV[j], ARGV[j+1], ARGV[j+2], ARGV[j+3], ARGV[j+4]
  local stored = becomes_current(ref, h, body)
  if stored then
    redis.call('HSET', base .. ':cur', ref, stored)
    if clin ~= '' then
      redis.call('ZADD', base .. ':tl', clin, ref)
    else
      redis.call('ZREM', base .. ':tl', ref)
    end
    if op ~= '' then
      local kind, name, sign, code = string.match(op, '^(%a+):(%a+):([+-]):?(.*)$')
      if kind == 'set' then
        if sign == '+' then redis.call('SADD', base .. ':set:' .. name, ref)
        else redis.call('SREM', base .. ':set:' .. name, ref) end
      elseif kind == 'latest' then
        local lkey = base .. ':latest:' .. name
        local prev = redis.call('HGET', lkey, code)
        local mine = string.format('%015d', tonumber(clin ~= '' and clin or '0') or 0) .. '|' .. ref
        if sign == '+' then
          if (not prev) or prev <= mine or string.sub(prev, 17) == ref then
            redis.call('HSET', lkey, code, mine)
          end
        elseif prev and string.sub(prev, 17) == ref then
          redis.call('HDEL', lkey, code)
        end
      end
    end
    changed[#changed + 1] = ref
  end
end
for i = 0, m - 1 do
  local j = d0 + 1 + i * 3
  local ref, h, body = ARGV[j], ARGV[j+1], ARGV[j+2]
  if becomes_current(ref, h, body) then
    local had = redis.call('HDEL', base .. ':cur', ref)
    redis.call('ZREM', base .. ':tl', ref)
    for _, name in ipairs({STATE_SETS}) do
      redis.call('SREM', base .. ':set:' .. name, ref)
    end
    for _, name in ipairs({STATE_LATEST}) do
      local lkey = base .. ':latest:' .. name
      local all = redis.call('HGETALL', lkey)
      for k = 1, #all, 2 do
        if string.sub(all[k+1], 17) == ref then redis.call('HDEL', lkey, all[k]) end
      end
    end
    if had == 1 then changed[#changed + 1] = ref end
  end
end
local meta = base .. ':meta'
local created = redis.call('HSETNX', meta, 'created', know)
redis.call('HSET', meta, 'updated', know)
if ARGV[4] ~= '' then
  local prev = tonumber(redis.call('HGET', meta, ARGV[4]) or '-1')
  if tonumber(ARGV[5]) > prev then redis.call('HSET', meta, ARGV[4], ARGV[5]) end
end
if #changed > 0 then
  -- the twin's generation: readers' caches (the API's views) compare it, O(1)
  if redis.call('HEXISTS', meta, 'gen') == 0 then
    local t = redis.call('TIME')  -- seeded past any value from before a flush or rebuild
    redis.call('HSET', meta, 'gen', t[1] .. string.format('%06d', tonumber(t[2])))
  end
  redis.call('HINCRBY', meta, 'gen', 1)
end
-- The reference index and the list of twins, in the same atomic step as the twin (so a
-- crash between the two cannot leave a resource the index misses): a ref enters the twin
-- only by changing it, and the twin enters Redis only by being created here.
if index ~= '' then
  local twin = string.sub(base, 5, -2)
  if index == 't' and created == 1 then redis.call('SADD', 'ft:twins', twin) end
  for _, ref in ipairs(changed) do redis.call('SADD', 'ft:ref:' .. ref, twin) end
end
return changed
"""
_LUA_SETS = "{" + ", ".join(f"'{n}'" for n in STATE_SETS) + "}"  # Lua table constructors
_LUA_LATEST = "{" + ", ".join(f"'{n}'" for n in STATE_LATEST) + "}"
_APPLY = _APPLY.replace("{STATE_SETS}", _LUA_SETS).replace("{STATE_LATEST}", _LUA_LATEST)

# The writes an applied event makes outside its twin's slot (the list of twins, who holds
# each resource, the identifiers that find the twin) and its identity log, for a whole
# batch in one call: one script run costs Redis and the client far less than the 15-25
# separate commands an event needs. ARGV: the counts of SADD, HSET, SET and LPUSH
# operations, then their arguments in that order (2, 3, 2 and 2 each). The keys are not
# declared, which a single server allows and a cluster does not: there the same
# operations go in a pipeline (``TwinStore._write_index``).
_INDEX = r"""
local a = 5
for _ = 1, tonumber(ARGV[1]) do redis.call('SADD', ARGV[a], ARGV[a+1]); a = a + 2 end
for _ = 1, tonumber(ARGV[2]) do redis.call('HSET', ARGV[a], ARGV[a+1], ARGV[a+2]); a = a + 3 end
for _ = 1, tonumber(ARGV[3]) do redis.call('SET', ARGV[a], ARGV[a+1]); a = a + 2 end
for _ = 1, tonumber(ARGV[4]) do redis.call('LPUSH', ARGV[a], ARGV[a+1]); a = a + 2 end
return a - 5
"""
_INDEX_CHUNK = 2_000  # operations per script run: each run holds Redis for ~1 ms at most

# An unmerge's last step (``TwinStore.unmerge``): the target's current state, rebuilt under
# the staging base KEYS[2] from what stays its own, replaces the live one (KEYS[1]) in one
# atomic step, unless an apply changed the twin since it was read (ARGV[1] = its ``gen``,
# ARGV[2] = the number of its assertions): then 0, and the caller starts over. ARGV[3] =
# the unmerge's time, then the assertion keys the target gives back (kept, retracted).
_SWAP = r"""
local base, stage = KEYS[1], KEYS[2]
local gen = redis.call('HGET', base .. ':meta', 'gen') or ''
local ok = gen == ARGV[1] and tostring(redis.call('HLEN', base .. ':vinfo')) == ARGV[2]
local names = {'cur', 'ver', 'tl'}
for _, n in ipairs({STATE_SETS}) do names[#names + 1] = 'set:' .. n end
for _, n in ipairs({STATE_LATEST}) do names[#names + 1] = 'latest:' .. n end
if ok then
  for _, n in ipairs(names) do
    if redis.call('EXISTS', stage .. ':' .. n) == 1 then
      redis.call('RENAME', stage .. ':' .. n, base .. ':' .. n)
    else
      redis.call('DEL', base .. ':' .. n)
    end
  end
  for i = 4, #ARGV do redis.call('HSET', base .. ':retracted', ARGV[i], ARGV[3]) end
  redis.call('HINCRBY', base .. ':meta', 'gen', 1)
end
for _, n in ipairs(names) do redis.call('DEL', stage .. ':' .. n) end
for _, n in ipairs({'vers', 'vinfo', 'hist', 'meta'}) do redis.call('DEL', stage .. ':' .. n) end
if ok then return 1 end
return 0
"""
_SWAP = _SWAP.replace("{STATE_SETS}", _LUA_SETS).replace("{STATE_LATEST}", _LUA_LATEST)


class IndexOps:
    """The index writes of one or more applied events, collected to be sent together.

    Repeats collapse: a batch names the same twin, resource or identifier many times, and
    SADD, HSET and SET of one key (and member or field) leave the same state when done once
    with the last value. LPUSH (the identity log) keeps every entry, in order."""

    __slots__ = ("hashes", "lists", "sets", "strings")

    def __init__(self) -> None:
        self.sets: dict[tuple[str, str], None] = {}
        self.hashes: dict[tuple[str, str], bytes] = {}
        self.strings: dict[str, str] = {}
        self.lists: list[tuple[str, bytes]] = []

    def __len__(self) -> int:
        return len(self.sets) + len(self.hashes) + len(self.strings) + len(self.lists)

    def sadd(self, key: str, member: str) -> None:
        self.sets[key, member] = None

    def hset(self, key: str, field: str, value: bytes) -> None:
        self.hashes[key, field] = value

    def set(self, key: str, value: str) -> None:
        self.strings[key] = value

    def lpush(self, key: str, value: bytes) -> None:
        self.lists.append((key, value))

    def chunks(self, size: int) -> Iterator[list[Any]]:
        """Script arguments, at most ``size`` operations a call, in the script's order."""
        ops: list[tuple[str, tuple[Any, ...]]] = [
            *(("S", k) for k in self.sets),
            *(("H", (k, f, v)) for (k, f), v in self.hashes.items()),
            *(("T", kv) for kv in self.strings.items()),
            *(("L", kv) for kv in self.lists),
        ]
        for start in range(0, len(ops), size):
            part = ops[start : start + size]
            counts = dict.fromkeys("SHTL", 0)
            args: list[Any] = []
            for kind, fields in part:
                counts[kind] += 1
                args += fields
            yield [counts["S"], counts["H"], counts["T"], counts["L"], *args]

    def into(self, pipe: Any) -> None:
        """The same writes as commands of a pipeline (a Redis Cluster runs them there)."""
        for key, member in self.sets:
            pipe.sadd(key, member)
        for (key, field), value in self.hashes.items():
            pipe.hset(key, field, value)
        for key, text in self.strings.items():
            pipe.set(key, text)
        for key, value in self.lists:
            pipe.lpush(key, value)


@dataclass(frozen=True, slots=True)
class AppliedEvent:
    twin: str
    changed: list[str]
    erased: bool = False  # the twin was erased: nothing was written


@dataclass(frozen=True, slots=True)
class Write:
    """One event for ``TwinStore.apply_many``: the arguments of ``apply``, and the identity
    decision to record with the twin once it is applied (``record_link``), if any."""

    twin: str
    resources: Sequence[dict[str, Any]]
    event_ms: int
    known_ms: int
    src: str = ""
    identifiers: Sequence[str] = ()
    shared: bool = False
    deleted: Sequence[str] = ()
    link: dict[str, Any] | None = None


class UnmergeError(ValueError):
    """An unmerge that cannot be done as asked (the twins were not merged that way)."""


class UnmergeNotFound(UnmergeError):
    """An unmerge asked for a patient or identifier that no twin holds."""


# The apply script's modes (its last argument): every body sent; bodies the twin was seen to
# hold left out, in a pipelined batch (a 'need' holds the twin's later events) or alone.
_FULL, _LAZY_ORDERED, _LAZY_ONE = "0", "1", "2"
_HELD_MAX = 250_000  # entries (~70 bytes each) before the memory of held versions restarts


def _evt15(ms: int) -> str:
    return f"{max(ms, 0):015d}"


class TwinStore:
    """Reads and idempotent writes of twins in Redis (a redis-py client is passed in)."""

    def __init__(self, client: RedisClient, keys: KeyRing | None = None) -> None:
        self.r: Any = client  # redis-py's reply types are bytes | str unions; we use bytes
        self.keys = keys or default_keyring()
        self._apply = client.register_script(_APPLY)
        self._index_script = client.register_script(_INDEX)
        self._swap = client.register_script(_SWAP)
        # On a single server the apply script writes the reference index and the list of
        # twins itself; a cluster refuses undeclared keys in a script, so there the client
        # sends them after each apply (``_index``).
        self._cluster = is_cluster(client)
        # hash("twin|Type/id|hash") of versions this store saw a twin hold (in its :vers): an
        # event that asserts one again sends no body. A collision costs nothing but a round
        # trip: the apply script checks that each body left out is held before writing.
        self._held: dict[int, None] = {}

    @classmethod
    def connect(cls, url: str) -> TwinStore:
        return cls(connect(url))

    # -- sealing -----------------------------------------------------------------------

    def _open(self, twin: str, blob: bytes, aad: str) -> bytes:
        return self.keys.open(twin, blob, aad.encode())

    def _load(self, twin: str, ref: str, digest: str, blob: bytes) -> dict[str, Any]:
        body: dict[str, Any] = orjson.loads(self._open(twin, blob, f"{twin}|{ref}|{digest}"))
        return body

    def id_key(self, ident: str) -> str:
        """The lookup key of an identifier ``system|value`` (a blind index)."""
        return f"ft:id:{self.keys.blind(ident)}"

    def value_key(self, value: str) -> str:
        """The lookup key of a bare identifier value (any system)."""
        return f"ft:idv:{self.keys.blind(value)}"

    # -- writes ------------------------------------------------------------------------

    @staticmethod
    def base(twin: str) -> str:
        return f"ft:{{{twin}}}"

    @staticmethod
    def _prepare(
        resources: Sequence[dict[str, Any]],
    ) -> list[tuple[str, str, bytes | dict[str, Any], Any, str]]:
        """(ref, hash, body, clinical ms, state op) per resource; the body is the plain JSON,
        or the resource itself while serializing it can wait (``_args`` may not need it)."""
        out: list[tuple[str, str, bytes | dict[str, Any], Any, str]] = []
        for res in resources:
            ref = f"{res['resourceType']}/{res['id']}"
            view = content_view(res)
            canonical = orjson.dumps(view, option=orjson.OPT_SORT_KEYS)
            digest = hashlib.sha256(canonical).hexdigest()[:32]
            # the canonical bytes are also what is stored when the view is the resource
            body: bytes | dict[str, Any] = canonical if view is res else res
            clin = clinical_time_ms(res)
            out.append((ref, digest, body, "" if clin is None else clin, state_op(res)))
        return out

    def _args(
        self,
        twin: str,
        prepared: list[tuple[str, str, bytes | dict[str, Any], Any, str]],
        event_ms: int,
        known_ms: int,
        src: str,
        deleted: Sequence[str] = (),
        mode: str = _FULL,
        names: list[int] | None = None,
        index: str = "",
    ) -> list[Any]:
        """The apply script's arguments. ``mode`` ``_FULL`` seals and sends every body;
        ``_LAZY_ORDERED`` and ``_LAZY_ONE`` leave out those the twin was seen to hold.
        ``names`` gets the hashed name of each version, for ``_saw_held`` once applied.
        ``index`` (``_index_mode``) lets the script write the reference index too."""
        partition_field = offset = ""
        if src.count("/") >= 2:
            topic, part, off = src.rsplit("/", 2)
            partition_field, offset = f"off:{topic}/{part}", off
        args: list[Any] = [known_ms, _evt15(event_ms), src, partition_field, offset, len(prepared)]
        seal = self.keys.seal
        held = self._held if mode != _FULL else {}
        for ref, digest, body, clin, op in prepared:
            aad = f"{twin}|{ref}|{digest}"
            name = hash(aad)
            if names is not None:
                names.append(name)
            if name in held:
                sealed = b""
            else:
                plain = body if type(body) is bytes else orjson.dumps(body)
                sealed = seal(twin, plain, aad.encode())
            args += [ref, digest, sealed, clin, op]
        args.append(len(deleted))
        digest = deletion_hash(event_ms)
        for ref in deleted:
            marker = orjson.dumps({"deleted": ref})
            args += [ref, digest, seal(twin, marker, f"{twin}|{ref}|{digest}".encode())]
        args += (mode, index)
        return args

    def _index_mode(self, shared: bool) -> str:
        """The apply script's index argument: '' on a cluster (``_index`` writes it)."""
        return "" if self._cluster else "s" if shared else "t"

    def _saw_held(self, names: list[int]) -> None:
        """After an apply: the twin holds every version the event asserted (``names`` from
        ``_args``)."""
        held = self._held
        if len(held) > _HELD_MAX:
            held.clear()
        held.update(dict.fromkeys(names))

    def apply(
        self,
        twin: str,
        resources: Sequence[dict[str, Any]],
        *,
        event_ms: int,
        known_ms: int,
        src: str = "",
        identifiers: Iterable[str] = (),
        shared: bool = False,
        deleted: Sequence[str] = (),
    ) -> AppliedEvent:
        """Apply one event's resources; follows merges (a merged twin forwards to its survivor).

        ``shared``: resources of messages that name no patient; kept, but not listed as a twin.
        ``deleted``: ``Type/id`` the source deleted at ``event_ms``: each leaves the current
        resources, the timeline and the derived state (unless a version with a later event
        time is held); its history stays (``history`` and ``as_of`` know it was deleted).
        """
        prepared = self._prepare(resources)
        via = ""  # the twin whose forward pointer led here, if any
        mode = _LAZY_ONE
        index = self._index_mode(shared)
        for _ in range(16):
            names: list[int] = []
            try:
                args = self._args(
                    twin, prepared, event_ms, known_ms, src, deleted, mode, names, index
                )
            except ErasedError:
                return AppliedEvent(twin, [], erased=True)
            out = self._apply(keys=[self.base(twin)], args=args)
            if out and out[0] == b"merged":
                via, twin = twin, out[1].decode()
                continue
            if out and out[0] == b"need":  # the twin no longer holds what was left out
                self._held.clear()
                mode = _FULL
                continue
            break
        else:  # pragma: no cover - a merge cycle would be a bug
            raise RuntimeError(f"merge chain too long at twin {twin}")
        if out and out[0] == b"erased":
            return AppliedEvent(twin, [], erased=True)
        self._saw_held(names)
        if via and src:  # an event for a twin merged away: an unmerge gives it back
            self.r.hset(f"{self.base(twin)}:origin", src, via)
        ops = IndexOps()
        self._index(ops, twin, resources, identifiers, shared)
        self._write_index(ops)
        return AppliedEvent(twin, [c.decode() for c in out])

    def _index(
        self,
        ops: IndexOps,
        twin: str,
        resources: Sequence[dict[str, Any]],
        identifiers: Iterable[str],
        shared: bool,
    ) -> None:
        """What an applied event adds outside the twin's own keys: the identifiers that
        find the twin; on a cluster also the list of twins and who holds each resource
        (elsewhere the apply script wrote those)."""
        if self._cluster:
            if not shared:
                ops.sadd("ft:twins", twin)
            for res in resources:
                ops.sadd(f"ft:ref:{res['resourceType']}/{res['id']}", twin)
        if ids := list(identifiers):
            self._link_ids(ops, twin, ids)

    def _write_index(self, ops: IndexOps) -> None:
        """Send collected index writes: one script run per 2,000 operations, or a pipeline
        on a Redis Cluster (the keys lie in many slots)."""
        if not len(ops):
            return
        if self._cluster:
            pipe = self.r.pipeline(transaction=False)
            ops.into(pipe)
            pipe.execute()
            return
        for args in ops.chunks(_INDEX_CHUNK):
            self._index_script(keys=[], args=args)  # redis-py reloads it after NOSCRIPT

    def apply_many(self, writes: Sequence[Write]) -> list[AppliedEvent]:
        """``apply`` (then ``record_link``) for each write, in order, with the same result,
        in two round trips to Redis for the whole batch instead of two per event.

        The apply scripts of all events go in one pipeline: Redis runs them one after the
        other in the order given, so one twin's events keep their order. An event whose twin
        turns out to be merged (the script changed nothing and names the survivor) is then
        applied alone with ``apply``, which follows the forward pointer; the other events
        of that twin get the same answer, so they are redone after it, in order. A Redis
        Cluster refuses scripts in pipelines: there each event is applied alone.
        """
        if self._cluster:
            out = []
            for w in writes:
                got = self._apply_write(w)
                if w.link is not None and not got.erased:
                    self.record_link(got.twin, w.link)
                out.append(got)
            return out
        results: list[AppliedEvent | None] = [None] * len(writes)
        calls: list[tuple[int, list[Any], list[int]]] = []
        for i, w in enumerate(writes):
            names: list[int] = []
            try:
                args = self._args(
                    w.twin,
                    self._prepare(w.resources),
                    w.event_ms,
                    w.known_ms,
                    w.src,
                    w.deleted,
                    _LAZY_ORDERED,
                    names,
                    self._index_mode(w.shared),
                )
            except ErasedError:
                results[i] = AppliedEvent(w.twin, [], erased=True)
                continue
            calls.append((i, args, names))
        answers = self._eval_many([(self.base(writes[i].twin), args) for i, args, _ in calls])
        ops = IndexOps()
        needed: set[str] = set()  # twins whose :need marker this batch set and cleared
        for (i, _, names), out in zip(calls, answers, strict=True):
            w = writes[i]
            if out and out[0] == b"need":
                # A body left out is no longer held (Redis flushed, an unmerge): this event
                # and the batch's later ones for the twin wrote nothing. Apply them now, in
                # order, each alone and with every body.
                if w.twin not in needed:
                    needed.add(w.twin)
                    self._held.clear()
                    self.r.delete(f"{self.base(w.twin)}:need")
                results[i] = got = self._apply_write(w)
            elif out and out[0] == b"merged":
                results[i] = got = self._apply_write(w)
            elif out and out[0] == b"erased":
                results[i] = got = AppliedEvent(w.twin, [], erased=True)
            else:
                results[i] = got = AppliedEvent(w.twin, [c.decode() for c in out])
                self._saw_held(names)
                self._index(ops, w.twin, w.resources, w.identifiers, w.shared)
            if w.link is not None and not got.erased:
                ops.lpush(f"{self.base(got.twin)}:links", self._seal_link(got.twin, w.link))
        self._write_index(ops)
        return [r for r in results if r is not None]

    def _apply_write(self, w: Write) -> AppliedEvent:
        return self.apply(
            w.twin,
            w.resources,
            event_ms=w.event_ms,
            known_ms=w.known_ms,
            src=w.src,
            identifiers=w.identifiers,
            shared=w.shared,
            deleted=w.deleted,
        )

    def _eval_many(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """The apply script over (key, args) pairs, pipelined; loads the script if Redis
        lost it (a restart) and runs again exactly the calls that found it missing."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            if not todo:
                break
            pipe = self.r.pipeline(transaction=False)
            for j in todo:
                key, args = calls[j]
                pipe.evalsha(self._apply.sha, 1, key, *args)
            missing = []
            for j, got in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(got, NoScriptError):
                    missing.append(j)
                elif isinstance(got, Exception):
                    raise got
                else:
                    results[j] = got
            if missing:
                self._apply.sha = self.r.script_load(_APPLY)
            todo = missing
        if todo:
            raise RuntimeError("Redis refused the twin apply script twice (NOSCRIPT)")
        return results

    def _link_ids(self, ops: IndexOps, twin: str, ids: Sequence[str]) -> None:
        blind, seal = self.keys.blind, self.keys.seal
        aad = f"{twin}|ids".encode()
        key = f"{self.base(twin)}:ids"
        for ident in ids:
            hidden = blind(ident)
            ops.hset(key, hidden, seal(twin, ident.encode(), aad))
            ops.set(f"ft:id:{hidden}", twin)
            value = ident.rsplit("|", 1)[-1]
            if value:
                ops.set(f"ft:idv:{blind(value)}", twin)

    def record_link(self, twin: str, decision: dict[str, Any]) -> None:
        self.r.lpush(f"{self.base(twin)}:links", self._seal_link(twin, decision))

    def _seal_link(self, twin: str, decision: dict[str, Any]) -> bytes:
        return self.keys.seal(twin, orjson.dumps(decision), f"{twin}|links".encode())

    def _assertions(
        self, twin: str, skip: Callable[[bytes], bool] | None = None
    ) -> dict[tuple[bytes, bytes, bytes], tuple[list[dict[str, Any]], list[str]]]:
        """Every assertion the twin holds (a version's first, and its content sent again
        later), decrypted and grouped by (event ms, known ms, source record): what applying
        them again, group by group in that order, needs. ``skip(source record)`` leaves some
        out; retracted ones (an unmerge gave them back) are always left out."""
        b = self.base(twin)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(f"{b}:vers")
        pipe.hgetall(f"{b}:vinfo")
        pipe.hkeys(f"{b}:retracted")
        versions, infos, retracted = pipe.execute()
        gone = set(retracted)
        grouped: dict[tuple[bytes, bytes, bytes], tuple[list[dict[str, Any]], list[str]]] = {}
        for key, info in {**dict.fromkeys(versions, b"0|0|"), **infos}.items():
            evt, know, src = info.split(b"|", 2)
            if key in gone or (skip is not None and skip(src)):
                continue
            ref, digest = key.decode().split("|")[:2]
            group = grouped.setdefault((evt, know, src), ([], []))
            if digest.startswith(DELETED_MARK):
                group[1].append(ref)
                continue
            body = versions.get(f"{ref}|{digest}".encode())
            if body is not None:
                group[0].append(self._load(twin, ref, digest, body))
        return grouped

    def _reapply(
        self,
        twin: str,
        grouped: dict[tuple[bytes, bytes, bytes], tuple[list[dict[str, Any]], list[str]]],
        into: str | None = None,
    ) -> list[str]:
        """Apply assertions grouped by ``_assertions`` to ``twin`` (to the keys under the
        base ``into`` instead, sealed for ``twin``, when given), each with its own event
        time, knowledge time and source record; the refs that changed."""
        changed: list[str] = []
        for evt, know, src in sorted(grouped):
            resources, deleted = grouped[(evt, know, src)]
            if into is None:
                changed += self.apply(
                    twin,
                    resources,
                    event_ms=int(evt),
                    known_ms=int(know),
                    src=src.decode(),
                    deleted=deleted,
                ).changed
            else:
                args = self._args(
                    twin, self._prepare(resources), int(evt), int(know), src.decode(), deleted
                )
                changed += [c.decode() for c in self._apply(keys=[into], args=args)]
        return changed

    def merge(
        self,
        source: str,
        target: str,
        *,
        known_ms: int,
        reason: dict[str, Any],
        src: str = "",
    ) -> list[str]:
        """Move every version of twin ``source`` into ``target`` and leave a forward pointer.

        Idempotent and safe to interrupt: the forward pointer is written first (so events
        for ``source`` that arrive meanwhile are redirected), copies are idempotent
        applies, and the source's data is deleted last. ``target`` keeps what undoing the
        merge needs (``unmerge``): the source's identifiers, the records its data came from
        and ``src``, the record of the merge itself.
        """
        if source == target:
            return []
        sb, tb = self.base(source), self.base(target)
        self.r.hset(f"{sb}:meta", mapping={"merged_into": target, "merged_at": known_ms})
        # Re-apply each version with its own event time and knowledge time (decrypted with
        # the source's key, sealed again with the target's by apply).
        grouped = self._assertions(source)
        changed = self._reapply(target, grouped)
        ids = self.identifiers(source)
        pipe = self.r.pipeline(transaction=False)
        if origins := {s.decode(): source for _, _, s in grouped if s}:
            pipe.hset(f"{tb}:origin", mapping=origins)
        record = {"identifiers": ids, "at": known_ms, "record": src}
        pipe.hset(
            f"{tb}:merges",
            source,
            self.keys.seal(target, orjson.dumps(record), f"{target}|merges|{source}".encode()),
        )
        pipe.execute()
        if ids:
            ops = IndexOps()
            self._link_ids(ops, target, ids)
            self._write_index(ops)
        pipe = self.r.pipeline(transaction=False)
        entry = {**reason, "merged": source, "into": target, "at": known_ms}
        pipe.lpush(f"{tb}:links", self._seal_link(target, entry))
        pipe.lpush(f"{sb}:links", self._seal_link(source, entry))
        for suffix in TWIN_SUFFIXES:  # what unmerging the source later needs stays
            if suffix not in ("meta", "links", "merges", "origin"):
                pipe.delete(f"{sb}:{suffix}")
        pipe.srem("ft:twins", source)
        pipe.execute()
        return changed

    def merged_from(self, twin: str) -> dict[str, dict[str, Any]]:
        """The twins merged into ``twin`` that an unmerge can give back: id → what was
        recorded (``identifiers``, ``at``, ``record``)."""
        out = {}
        for source, sealed in self.r.hgetall(f"{self.base(twin)}:merges").items():
            s = source.decode()
            out[s] = orjson.loads(self._open(twin, sealed, f"{twin}|merges|{s}"))
        return out

    def unmerge(
        self,
        source: str,
        target: str,
        *,
        known_ms: int,
        reason: dict[str, Any],
        src: str = "",
    ) -> tuple[list[str], list[str]]:
        """Undo ``merge(source, target)``: (refs changed in ``target``, refs of ``source``).

        ``source`` lives again under its own id with every assertion that came from it —
        moved by the merge, or sent for it through the forward pointer later — each with its
        own event and knowledge time, and its identifiers find it again. ``target`` keeps
        its own assertions; the merge message's are withdrawn too (they said the two were
        one patient). What ``target`` gives back stays in its history, marked retracted:
        ``as_of`` a time before the unmerge still answers as the twin was then.

        Idempotent: a redelivered unmerge finds nothing left to do. Safe to interrupt: the
        source gets its data back before the target's current state is swapped, atomically
        (a script; it starts over when an apply changed the target meanwhile).
        """
        sb, tb = self.base(source), self.base(target)
        if into := self._merged_into(target):
            raise UnmergeError(
                f"twin {target} was itself merged into {into.decode()}: "
                f"unmerge {target} from {into.decode()} first"
            )
        sealed = self.r.hget(f"{tb}:merges", source)
        if sealed is None:
            if self.r.hget(f"{sb}:meta", "unmerged_at") and not self.r.hget(
                f"{sb}:meta", "merged_into"
            ):
                return [], []  # done already
            raise UnmergeError(
                f"twin {source} is not merged into twin {target}"
                + (f" (it is merged into {m.decode()})" if (m := self._merged_into(source)) else "")
            )
        record = orjson.loads(self._open(target, sealed, f"{target}|merges|{source}"))
        theirs = {s for s, t in self.r.hgetall(f"{tb}:origin").items() if t == source.encode()}
        merge_rec = str(record.get("record") or "").encode()

        def given_back(s: bytes) -> bool:
            return s in theirs or (bool(merge_rec) and s == merge_rec)

        # 1. The source lives again: events for it land in it from now on, and it gets back
        #    what it asserted (not the merge message's assertions: they are withdrawn).
        self.r.hdel(f"{sb}:meta", "merged_into", "merged_at")
        self.r.hset(f"{sb}:meta", "unmerged_at", known_ms)
        back = self._assertions(target, lambda s: s not in theirs)
        restored = self._reapply(source, back)
        # 2. The target's current state, rebuilt from what stays its own, swapped in at once.
        stage = f"{tb}:unmerging"
        before = self.r.hgetall(f"{tb}:ver")
        for _ in range(8):
            pipe = self.r.pipeline(transaction=False)
            pipe.hget(f"{tb}:meta", "gen")
            pipe.hlen(f"{tb}:vinfo")
            pipe.hgetall(f"{tb}:vinfo")
            pipe.hkeys(f"{tb}:retracted")
            gen, n, infos, already = pipe.execute()
            gone = set(already)
            withdrawn = [
                k for k, v in infos.items() if k not in gone and given_back(v.split(b"|", 2)[2])
            ]
            self.r.delete(*[f"{stage}:{x}" for x in TWIN_SUFFIXES])
            self._reapply(target, self._assertions(target, given_back), into=stage)
            args = [gen or b"", n, known_ms, *withdrawn]
            if self._swap(keys=[tb, stage], args=args):
                break
        else:  # pragma: no cover - eight applies racing one unmerge
            raise RuntimeError(f"twin {target} kept changing during the unmerge")
        after = self.r.hgetall(f"{tb}:ver")
        changed = sorted(  # what left, or holds another content now
            r.decode()
            for r in set(before) | set(after)
            if (before.get(r) or b"")[15:47] != (after.get(r) or b"")[15:47]
        )
        # 3. Identifiers, indexes, the identity log.
        ids = [str(i) for i in record.get("identifiers") or ()]
        pipe = self.r.pipeline(transaction=False)
        if theirs:
            pipe.hdel(f"{tb}:origin", *theirs)
        pipe.hdel(f"{tb}:merges", source)
        if ids:
            pipe.hdel(f"{tb}:ids", *[self.keys.blind(i) for i in ids])
        for ref in set(before) - set(after):
            pipe.srem(f"ft:ref:{ref.decode()}", target)
        pipe.execute()
        ops = IndexOps()
        ops.sadd("ft:twins", source)
        for ref in self.r.hkeys(f"{sb}:cur"):
            ops.sadd(f"ft:ref:{ref.decode()}", source)
        if ids:
            self._link_ids(ops, source, ids)
        entry = {**reason, "unmerged": source, "from": target, "at": known_ms, "record": src}
        ops.lpush(f"{tb}:links", self._seal_link(target, entry))
        ops.lpush(f"{sb}:links", self._seal_link(source, entry))
        self._write_index(ops)
        return changed, sorted(set(restored))

    def _merged_into(self, twin: str) -> bytes | None:
        got: bytes | None = self.r.hget(f"{self.base(twin)}:meta", "merged_into")
        return got

    # -- reads -------------------------------------------------------------------------

    def resolve(self, key: str) -> str | None:
        """A twin id, or any identifier (``system|value`` or a bare value such as an MRN)."""
        if self.r.sismember("ft:twins", key) or self.r.exists(f"{self.base(key)}:meta"):
            return self._follow(key)
        twin = self.r.get(self.id_key(key))
        if not twin and "|" not in key:  # a bare value: any system
            twin = self.r.get(self.value_key(key))
        if twin:
            return self._follow(twin.decode())
        return None

    def _follow(self, twin: str) -> str:
        return follow_merges(self.r, twin)

    def holders(self, ref: str) -> list[str]:
        """The live twins whose current resources include ``ref`` (``Type/id``)."""
        found = sorted({self._follow(t.decode()) for t in self.r.smembers(f"ft:ref:{ref}")})
        if not found:
            return []
        pipe = self.r.pipeline(transaction=False)
        for t in found:
            pipe.hexists(f"{self.base(t)}:cur", ref)
        return [t for t, has in zip(found, pipe.execute(), strict=True) if has]

    def twins(self) -> list[str]:
        return sorted(t.decode() for t in self.r.smembers("ft:twins"))

    def identifiers(self, twin: str) -> list[str]:
        aad = f"{twin}|ids"
        sealed = self.r.hvals(f"{self.base(twin)}:ids")
        return sorted(self._open(twin, v, aad).decode() for v in sealed)

    def counts(self, twin: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for ref in self.r.hkeys(f"{self.base(twin)}:cur"):
            rtype = ref.decode().split("/", 1)[0]
            out[rtype] = out.get(rtype, 0) + 1
        return dict(sorted(out.items()))

    def resources(self, twin: str) -> list[dict[str, Any]]:
        """Current version of every resource, with meta.versionId / lastUpdated set."""
        b = self.base(twin)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(f"{b}:cur")
        pipe.hgetall(f"{b}:ver")
        cur, ver = pipe.execute()
        out = []
        aead = self.keys.open
        for ref, body in cur.items():
            order = ver.get(ref, b"")
            aad = b"%s|%s|%s" % (twin.encode(), ref, order[15:47])
            out.append(_with_meta(orjson.loads(aead(twin, body, aad)), order))
        out.sort(key=lambda r: (r["resourceType"], r["id"]))
        return out

    def resource(self, twin: str, ref: str) -> dict[str, Any] | None:
        b = self.base(twin)
        body, ver = self.r.hmget(f"{b}:cur", ref), self.r.hget(f"{b}:ver", ref)
        if not body or body[0] is None:
            return None
        order = ver or b""
        return _with_meta(self._load(twin, ref, order[15:47].decode(), body[0]), order)

    def history(self, twin: str, ref: str) -> list[dict[str, Any]]:
        """Every known version of one resource (each content once, at the latest event
        time it was sent with), newest first."""
        b = self.base(twin)
        infos = self.r.hgetall(f"{b}:vinfo")
        gone = set(self.r.hkeys(f"{b}:retracted"))  # given back by an unmerge
        latest: dict[str, tuple[str, str]] = {}  # hash → (event ms, known ms) of its newest
        for k, info in infos.items():
            parts = k.decode().split("|")
            if parts[0] != ref or parts[1].startswith(DELETED_MARK) or k in gone:
                continue  # another resource, a deletion (not a version of it), given back
            evt, know, _src = info.decode().split("|", 2)
            if parts[1] not in latest or latest[parts[1]][0] < evt:
                latest[parts[1]] = (evt, know)
        if not latest:
            return []
        hashes = list(latest)
        bodies = self.r.hmget(f"{b}:vers", [f"{ref}|{h}" for h in hashes])
        out = []
        for h, body in zip(hashes, bodies, strict=True):
            if body is None:
                continue
            evt, know = latest[h]
            res = _with_meta(self._load(twin, ref, h, body), f"{evt}{h}|{know}".encode())
            out.append((evt + h, res))
        out.sort(key=lambda x: x[0], reverse=True)
        return [r for _, r in out]

    def timeline(self, twin: str, limit: int = 0) -> list[tuple[int, str]]:
        end = -1 if limit <= 0 else limit - 1
        items = self.r.zrange(f"{self.base(twin)}:tl", 0, end, withscores=True)
        return [(int(score), ref.decode()) for ref, score in items]

    def state(self, twin: str) -> dict[str, Any]:
        """The derived summary: active problems, medications, allergies, latest vitals/labs."""
        b = self.base(twin)
        pipe = self.r.pipeline(transaction=False)
        for name in STATE_SETS:
            pipe.smembers(f"{b}:set:{name}")
        for name in STATE_LATEST:
            pipe.hgetall(f"{b}:latest:{name}")
        raw = pipe.execute()
        state: dict[str, Any] = {}
        for name, members in zip(STATE_SETS, raw[: len(STATE_SETS)], strict=True):
            state[name] = sorted(m.decode() for m in members)
        for name, latest in zip(STATE_LATEST, raw[len(STATE_SETS) :], strict=True):
            state[name] = {
                code.decode(): v.decode().split("|", 1)[1] for code, v in sorted(latest.items())
            }
        return state

    def meta(self, twin: str) -> dict[str, str]:
        return {
            k.decode(): v.decode() for k, v in self.r.hgetall(f"{self.base(twin)}:meta").items()
        }

    def offsets(self, twin: str) -> dict[str, int]:
        return {k[4:]: int(v) for k, v in self.meta(twin).items() if k.startswith("off:")}

    def as_of(self, twin: str, known_ms: int) -> dict[str, Any]:
        """The twin as fhirtwin knew it at ``known_ms``: resources and the offsets behind them."""
        b = self.base(twin)
        members = self.r.zrangebyscore(f"{b}:hist", "-inf", known_ms)
        if not members:
            return {"twin": twin, "as_of_ms": known_ms, "resources": [], "offsets": {}}
        infos = self.r.hmget(f"{b}:vinfo", members)
        # what an unmerge had given back by then is no longer the twin's
        gone = {k for k, t in self.r.hgetall(f"{b}:retracted").items() if int(t) <= known_ms}
        best: dict[str, tuple[str, bytes, str]] = {}
        offsets: dict[str, int] = {}
        for member, info in zip(members, infos, strict=True):
            if info is None or member in gone:
                continue
            ref, h = member.decode().split("|")[:2]  # a content sent again: ref|hash|event
            evt, know, src = info.decode().split("|", 2)
            order = evt + h
            if ref not in best or best[ref][0] < order:
                best[ref] = (order, f"{ref}|{h}".encode(), know)
            if src.count("/") >= 2:
                topic, part, off = src.rsplit("/", 2)
                key = f"{topic}/{part}"
                offsets[key] = max(offsets.get(key, -1), int(off))
        chosen = sorted(i for i in best.items() if not i[1][0][15:].startswith(DELETED_MARK))
        bodies = self.r.hmget(f"{b}:vers", [m for _, (_, m, _) in chosen])
        resources = [
            _with_meta(self._load(twin, ref, order[15:], body), f"{order}|{know}".encode())
            for (ref, (order, _m, know)), body in zip(chosen, bodies, strict=True)
            if body is not None
        ]
        return {"twin": twin, "as_of_ms": known_ms, "resources": resources, "offsets": offsets}

    def digest(self, twin: str) -> str:
        """Hash of what the twin holds (current version hashes, identifiers, state), not of
        when it learnt it: equal for a clean run, a crashed-and-resumed run and a rebuild."""
        b = self.base(twin)
        ver = self.r.hgetall(f"{b}:ver")
        lines = sorted(f"{k.decode()} {v.decode()[15:47]}" for k, v in ver.items())
        lines += sorted(f"id {i}" for i in self.identifiers(twin))
        lines.append(orjson.dumps(self.state(twin), option=orjson.OPT_SORT_KEYS).decode())
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def links(self, twin: str) -> list[dict[str, Any]]:
        aad = f"{twin}|links"
        return [
            orjson.loads(self._open(twin, x, aad))
            for x in self.r.lrange(f"{self.base(twin)}:links", 0, -1)
        ]

    def flush(self) -> int:
        """Delete every twin and identity key — for `fhirtwin rebuild`. Returns the count.

        Only what fhir.resources rebuilds: twins (``ft:{…}``), identifiers, demographic
        keys, the reference index and the twin index. Subscribers, pseudonyms, the audit
        tree and dead-letter bookkeeping are not derived from that topic and stay.
        """
        n = 0
        batch: list[bytes] = []
        for pattern in ("ft:{*", "ft:id:*", "ft:idv:*", "ft:ref:*", "ft:demo:*"):
            for key in self.r.scan_iter(match=pattern, count=2000):
                if key.endswith(b":erased"):
                    continue  # erasure tombstones outlive a rebuild
                batch.append(key)
                if len(batch) >= 1000:
                    n += int(self.r.unlink(*batch))
                    batch.clear()
        if batch:
            n += int(self.r.unlink(*batch))
        return n + int(self.r.unlink("ft:twins"))


def follow_merges(client: Any, twin: str) -> str:
    """The live twin that ``twin`` was merged into (itself when it was never merged)."""
    return follow_merges_many(client, [twin])[twin]


def follow_merges_many(client: Any, twins: Iterable[str]) -> dict[str, str]:
    """``follow_merges`` for several twins: one round trip when none was merged (the usual
    case), one more per step of a merge chain."""
    live = {t: t for t in twins}
    pending = list(live)
    for _ in range(16):
        if not pending:
            break
        pipe = client.pipeline(transaction=False)
        for t in pending:
            pipe.hget(f"ft:{{{live[t]}}}:meta", "merged_into")
        moved = []
        for t, nxt in zip(pending, pipe.execute(), strict=True):
            if nxt:
                live[t] = nxt.decode()
                moved.append(t)
        pending = moved
    return live


def _with_meta(res: dict[str, Any], ver: bytes) -> dict[str, Any]:
    text = ver.decode()
    if len(text) >= 47:
        meta = dict(res.get("meta") or {})
        meta["versionId"] = text[15:31]
        know = text.split("|", 1)[1] if "|" in text else ""
        if know.isdigit():
            meta["lastUpdated"] = (
                (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(know)))
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
        res = {**res, "meta": meta}
    return res
