"""Hostile input gets a clear 4xx with the documented body, small, and changes nothing.

Found by fuzzing the running stack: dates past the calendar, forged page tokens, sources
checked only once a run had been created, huge values echoed back whole, and a dry-run
that named another tenant's exact id. Every answer here is checked over REST (through
Envoy) and, where the field can be sent that way, over native gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import string
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from convergence.v1 import (
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)
from convergence_server import faults
from convergence_server.config import REPO_ROOT
from convergence_server.engine.runner import (
    OpenedSource,
    SourceFolders,
    SourceRefused,
    open_source,
    resolve_source,
)
from convergence_server.stack import Stack
from tests.conftest import (
    GUIDE_TENANT,
    UNMETERED,
    StackFactory,
    eventually,
    onboard,
    trigger,
    wait_for_run,
)

QUICK = "test/runs/quick"
SLOW = "test/runs/slow"
AWS = "aws/cost/cost_usage"
DAY = "2023-11-04"
SAMPLE = REPO_ROOT / "configs" / "sample_data" / "aws_cur_sample.csv"
DATE_ISSUE = "must be a date YYYY-MM-DD from 2000-01-01 to 2099-12-31"
HIDDEN = "must not contain control or invisible format characters"
OUTSIDE = "is outside the allowed source folders"
CLIMBS = "must not climb out of its folder with '..'"
WILDCARD = "must name one file: a local path holds no wildcard (*, ? or [)"
NOT_A_FILE = "names a file that does not exist"
SCHEME = "must be a local path or a gs:// URI"
FOREIGN_TOKEN = "is not a token this server issued"
CASE_CONFLICT = (
    "tenant_id differs only in letter case from an existing tenant; choose another tenant_id"
)
# What "small" means for an answer to a 40 KB input: the error with its bounded echo.
SMALL = 1024
# An onboarding refusal carries the whole dry-run report (15 checks) beside the error.
SMALL_REPORT = 4096
HUGE = 40_000
# The longest value that still fits in a URL Envoy accepts (its header limit is 16 KiB).
LONG_IN_URL = 12_000


def auth(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def assert_refused(
    response: httpx.Response, field: str, issue: str | None = None, limit: int = SMALL
) -> dict[str, object]:
    """A 400 with the documented body naming `field` (and `issue`), at most `limit` bytes."""
    assert response.status_code == 400, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    assert len(response.content) <= limit, len(response.content)
    body: dict[str, object] = response.json()
    assert body["error"] == "Validation error"
    assert isinstance(body["message"], str) and body["message"]
    details = body["details"]
    assert isinstance(details, dict)
    assert details["field"] == field, body
    if issue is not None:
        assert details["issue"] == issue, body
    return body


def assert_edge_refusal(response: httpx.Response) -> None:
    """A request Envoy refuses itself: a small 4xx JSON body with an error."""
    assert 400 <= response.status_code < 500, response.text[:500]
    assert len(response.content) <= SMALL
    assert response.json()["error"]


def grpc_refusal(error: grpc.RpcError, limit: int = SMALL) -> list[tuple[str, str]]:
    """The (field, issue) pairs of an INVALID_ARGUMENT; its status and trailers are small."""
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert len(details) <= limit
    trailers = dict(error.trailing_metadata() or ())
    assert sum(len(k) + len(v) for k, v in trailers.items()) <= limit + SMALL
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Unpack(bad_request):
            break
    return [(v.field, v.description) for v in bad_request.field_violations]


def assert_nothing_spent(http: httpx.Client, tenant_id: str, key: str) -> None:
    """No run was created and no daily run was counted."""
    runs = http.get("/api/v1/pipelines/runs", headers=auth(key))
    assert runs.json() == {"runs": [], "next_page_token": ""}
    usage = http.get(f"/api/v1/tenants/{tenant_id}/usage", headers=auth(key)).json()
    assert int(usage["pipelines_run_today"]) == 0, usage
    assert int(usage["concurrent_pipelines_running"]) == 0, usage


def post_trigger(
    http: httpx.Client, key: str, tenant_id: str, template: str, **body: object
) -> httpx.Response:
    return http.post(f"/api/v1/pipelines/run/{tenant_id}/{template}", headers=auth(key), json=body)


@pytest.fixture(scope="module")
def grpc_channel(pipelines: Stack) -> Iterator[grpc.Channel]:
    """Native gRPC to the server of the pipelines stack (no Envoy in between)."""
    with grpc.insecure_channel(pipelines.grpc_target) as channel:
        yield channel


def run_pipeline(
    channel: grpc.Channel, key: str, metadata: tuple[tuple[str, str], ...] = (), **fields: object
) -> grpc.RpcError:
    request = pipeline_service_pb2.RunPipelineRequest(**fields)
    with pytest.raises(grpc.RpcError) as raised:
        pipeline_service_pb2_grpc.PipelineServiceStub(channel).RunPipeline(
            request, metadata=(("x-api-key", key), *metadata)
        )
    return raised.value


# -- dates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("end_date=9999-12-31", "end_date"),
        ("start_date=0001-01-01", "start_date"),
        ("start_date=1999-12-31", "start_date"),
        ("end_date=2100-01-01", "end_date"),
        ("end_date=2025-02-30", "end_date"),
        ("start_date=%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%95-01-01", "start_date"),  # fullwidth
    ],
)
def test_listing_dates_out_of_range_are_refused(http: httpx.Client, query: str, field: str) -> None:
    _, key = onboard(http)
    response = http.get(f"/api/v1/pipelines/runs?{query}", headers=auth(key))
    body = assert_refused(response, field, DATE_ISSUE)
    assert body["message"] == f"Invalid {field}"


def test_listing_accepts_the_whole_date_range(http: httpx.Client) -> None:
    _, key = onboard(http)
    response = http.get(
        "/api/v1/pipelines/runs?start_date=2000-01-01&end_date=2099-12-31", headers=auth(key)
    )
    assert response.status_code == 200, response.text
    assert response.json()["runs"] == []


def test_trigger_dates_are_bounded(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    cases: list[tuple[dict[str, object], str]] = [
        ({"date": "9999-12-31"}, DATE_ISSUE),
        ({"date": "0001-01-01"}, DATE_ISSUE),
        ({"date": "1999-12-31"}, DATE_ISSUE),
        ({"date": "2100-01-01"}, DATE_ISSUE),
        ({"parameters": {"date": "2100-01-01"}}, DATE_ISSUE),
        ({"date": "x" * HUGE}, "must be at most 2048 characters"),
    ]
    for body, issue in cases:
        assert_refused(post_trigger(api, key, tenant_id, QUICK, **body), "date", issue)
    assert_nothing_spent(api, tenant_id, key)
    for edge in ("2000-01-01", "2099-12-31"):
        assert post_trigger(api, key, tenant_id, QUICK, date=edge).status_code == 200


# -- page tokens ----------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_page_tokens_are_signed_and_bounded(api: httpx.Client, grpc_channel: grpc.Channel) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    for _ in range(3):
        trigger(api, key, tenant_id, QUICK)
    first = api.get("/api/v1/pipelines/runs?limit=1", headers=auth(key)).json()
    token = first["next_page_token"]
    second = api.get(
        "/api/v1/pipelines/runs", params={"limit": "1", "page_token": token}, headers=auth(key)
    )
    assert second.status_code == 200, second.text
    assert (
        second.json()["runs"][0]["pipeline_logging_id"] != first["runs"][0]["pipeline_logging_id"]
    )

    payload, mac = token.split(".")
    cursor = json.loads(unb64(payload))
    rewound = b64(json.dumps({**cursor, "c": "0001-01-01T00:00:00"}).encode())
    forged_mac = b64(bytes(32))
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    # The same MAC bytes spelled differently: the last character's spare low bits.
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    respelled = mac[:-1] + alphabet[alphabet.index(mac[-1]) ^ 1]
    for bad in (
        b64(b"[" * 5000),  # once sent the JSON parser into a RecursionError
        f"{b64(json.dumps({**cursor, 'c': '0001-01-01T00:00:00'}).encode())}.{forged_mac}",
        f"{rewound}.{mac}",  # the MAC of another payload
        f"{payload}.{flipped}",
        f"{payload}.{respelled}",
        token[:-4],
        f"{token}=",
        f"{token}.{mac}",
        "x" * 8000,
        "garbage",
    ):
        response = api.get("/api/v1/pipelines/runs", params={"page_token": bad}, headers=auth(key))
        assert_refused(response, "page_token", FOREIGN_TOKEN)

    # A genuine token serves only its own tenant (and filters).
    _, other_key = onboard(api, plan=UNMETERED)
    response = api.get(
        "/api/v1/pipelines/runs",
        params={"limit": "1", "page_token": token},
        headers=auth(other_key),
    )
    assert_refused(response, "page_token")

    stub = run_service_pb2_grpc.RunServiceStub(grpc_channel)
    for bad in (f"{rewound}.{mac}", "y" * HUGE):
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListRuns(
                run_service_pb2.ListRunsRequest(page_token=bad), metadata=[("x-api-key", key)]
            )
        assert grpc_refusal(raised.value) == [("page_token", FOREIGN_TOKEN)]


# -- sources --------------------------------------------------------------------------------


def test_sources_are_checked_before_a_run_is_created(
    api: httpx.Client, sources_dir: Path, config_dir: Path, grpc_channel: grpc.Channel
) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    other_id, _ = onboard(api, plan=UNMETERED)
    own, theirs = sources_dir / tenant_id, sources_dir / other_id
    own.mkdir()
    theirs.mkdir()
    good = own / "cur.csv"
    shutil.copy(SAMPLE, good)
    secret = theirs / "private.csv"
    shutil.copy(SAMPLE, secret)
    (own / "link.csv").symlink_to(secret)
    # A folder named like a pattern beside a link to the other tenant's folder: DuckDB
    # would expand the pattern, and follow the link.
    (own / "e*").mkdir()
    shutil.copy(SAMPLE, own / "e*" / "private.csv")
    (own / "elink").symlink_to(theirs)
    (own / "star.csv").symlink_to(own / "e*" / "private.csv")
    attempts = {
        f"{own}/e*/private.csv": WILDCARD,
        f"{own}/e?/private.csv": WILDCARD,
        f"{own}/e[lx]ink/private.csv": WILDCARD,
        str(own / "star.csv"): WILDCARD,
        f"{good}\x00.csv": HIDDEN,  # once ended its run with an internal error
        f"{good}\n": HIDDEN,
        f"{own}/\u202evsc.csv": HIDDEN,
        str(secret): OUTSIDE,
        str(own / "link.csv"): OUTSIDE,
        "/etc/passwd": OUTSIDE,
        "cur.csv": OUTSIDE,
        f"{own}/../{other_id}/private.csv": CLIMBS,
        "{sample_data}/../../README.md": CLIMBS,
        "https://example.com/cur.csv": SCHEME,
        "s3://bucket/cur.csv": SCHEME,
        "file:///etc/passwd": SCHEME,
        "gs://someone-elses-bucket/cur.csv": OUTSIDE,
        str(own / "missing.csv"): NOT_A_FILE,
        "{sample_data}/missing.csv": NOT_A_FILE,
        "{sample_data}": NOT_A_FILE,
        "{sample_data}://x": SCHEME,
        str(own): NOT_A_FILE,
        f"{own}/{'n' * 300}.csv": NOT_A_FILE,  # a name too long for the file system
        "": "is empty",
        str(own / ("x" * 2100)): "must be at most 2048 characters",
    }
    for uri, issue in attempts.items():
        response = post_trigger(api, key, tenant_id, AWS, date=DAY, parameters={"source_uri": uri})
        body = assert_refused(response, "parameters.source_uri", issue)
        assert body["message"] == "Invalid parameter source_uri"
        # The source as sent: the server's own folders are not shown.
        assert str(config_dir) not in response.text
    error = run_pipeline(
        grpc_channel,
        key,
        tenant_id=tenant_id,
        provider="aws",
        domain="cost",
        template="cost_usage",
        parameters={"source_uri": f"{good}\x00"},
    )
    assert grpc_refusal(error) == [("parameters.source_uri", HIDDEN)]
    assert_nothing_spent(api, tenant_id, key)

    # The tenant's own file, and the shared samples, are accepted and load.
    for uri in (str(good), "{sample_data}/aws_cur_sample.csv"):
        run = trigger(api, key, tenant_id, AWS, date=DAY, parameters={"source_uri": uri})
        done = wait_for_run(api, key, run["pipeline_logging_id"])
        assert done["status"] == "COMPLETE", done


def test_a_run_shows_a_sample_as_its_source_named_it(api: httpx.Client, config_dir: Path) -> None:
    """`{sample_data}` stands for a folder of the server's: a run reading a sample, and
    one failing to, show the source as it was written, never where the server keeps it."""
    tenant_id, key = onboard(api, plan=UNMETERED)
    for name in ("aws_cur_sample.csv", f"broken_{tenant_id}.csv"):
        if name.startswith("broken"):
            (config_dir / "sample_data" / name).write_bytes(b'"unclosed\n' + b"\xff\x00" * 64)
        source = f"{{sample_data}}/{name}"
        run = trigger(api, key, tenant_id, AWS, date=DAY, parameters={"source_uri": source})
        run_id = run["pipeline_logging_id"]
        done = wait_for_run(api, key, run_id)
        steps = api.get(f"/api/v1/pipelines/runs/{run_id}/steps", headers={"X-API-Key": key})
        assert steps.status_code == 200, steps.text
        assert done["status"] == ("COMPLETE" if name.startswith("aws") else "FAILED"), done
        assert str(config_dir) not in json.dumps(done) + steps.text, (done, steps.text)


def test_a_run_shows_a_number_parameter_in_its_shortest_form(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    shown = {}
    for given in (None, "1e9", "2.50", "1e16", "0.0025"):
        parameters = {} if given is None else {"max_row_cost": given}
        run = trigger(api, key, tenant_id, AWS, date=DAY, parameters=parameters)
        got = api.get(f"/api/v1/pipelines/runs/{run['pipeline_logging_id']}", headers=auth(key))
        shown[given] = got.json()["parameters"]["max_row_cost"]
    assert shown == {
        None: "1000000000",
        "1e9": "1000000000",
        "2.50": "2.5",
        "1e16": "1e+16",
        "0.0025": "0.0025",
    }


def test_a_sample_gone_before_its_run_reads_it_is_shown_as_its_source_named_it(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    config_dir: Path,
    tmp_path: Path,
) -> None:
    """The run checks its source again when its load step starts: a sample removed since
    the trigger fails the run, which shows the source as written (a server's folder was
    shown before)."""
    data = tmp_path / "data"
    hold = data / "hold" / faults.BETWEEN_STEPS
    hold.parent.mkdir(parents=True)
    hold.touch()  # runs wait before their first step
    stack = stack_factory(data_dir=data, **pipeline_env, CONVERGENCE_FAULT_POINTS=hold.name)
    sample = config_dir / "sample_data" / f"vanishing_{uuid.uuid4().hex}.csv"
    shutil.copy(SAMPLE, sample)
    source = f"{{sample_data}}/{sample.name}"
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run = trigger(http, key, tenant_id, AWS, date=DAY, parameters={"source_uri": source})
        log = data / "logs" / "server.log"
        eventually(lambda: f"fault point {hold.name}: holding" in log.read_text(), "the hold")
        sample.unlink()
        hold.unlink()
        run_id = run["pipeline_logging_id"]
        done = wait_for_run(http, key, run_id)
        steps = http.get(f"/api/v1/pipelines/runs/{run_id}/steps", headers={"X-API-Key": key})
    assert done["status"] == "FAILED", done
    assert f"source '{source}' names a file that does not exist" in done["error_message"]
    assert str(config_dir) not in json.dumps(done) + steps.text, (done, steps.text)


LEDGER = "id,account,currency,day,amount\n1,acme,USD,2023-11-04,1.50\n"


@pytest.mark.parametrize(
    ("template", "content"),
    [(AWS, SAMPLE.read_text()), ("test/runs/daily", LEDGER)],
    ids=["a_version_loaded_once", "a_stage"],
)
def test_a_folder_swapped_for_a_link_after_the_check_is_not_followed(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path: Path,
    template: str,
    content: str,
) -> None:
    """The load step reads the file it checked: a tenant that swaps a folder of its source
    for a link to another tenant's folder once the check has passed (the fault point holds
    the step there) still loads its own file. The step read the path again before, and
    followed the link. Both kinds of load: a file version loaded once for the runs that
    read it (`reuse: true`), and a run's own stage."""
    data = tmp_path / "data"
    hold = data / "hold" / faults.BEFORE_SOURCE_READ
    hold.parent.mkdir(parents=True)
    hold.touch()
    stack = stack_factory(data_dir=data, **pipeline_env, CONVERGENCE_FAULT_POINTS=hold.name)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        other_id, _ = onboard(http, plan=UNMETERED)
        own, theirs = sources_dir / tenant_id / "exports", sources_dir / other_id / "exports"
        own.mkdir(parents=True)
        theirs.mkdir(parents=True)
        (own / "cur.csv").write_text(content)
        # Not a file the tenant could load: read, it would fail the run.
        (theirs / "cur.csv").write_text("private\n")
        source = {"source_uri": str(own / "cur.csv")}
        run = trigger(http, key, tenant_id, template, date=DAY, parameters=source)
        log = data / "logs" / "server.log"
        eventually(lambda: f"fault point {hold.name}: holding" in log.read_text(), "the hold")
        own.rename(own.with_name("checked"))
        own.symlink_to(theirs)
        hold.unlink()
        run_id = run["pipeline_logging_id"]
        done = wait_for_run(http, key, run_id)
        steps = http.get(f"/api/v1/pipelines/runs/{run_id}/steps", headers=auth(key)).json()
    assert done["status"] == "COMPLETE", done
    assert steps["steps"][0]["rows_processed"] == len(content.splitlines()) - 1


def test_a_source_opens_only_as_checked(tmp_path: Path) -> None:
    """`open_source` walks from the tenant's folder without following a link: whatever
    became a link, or stopped being a file, since `resolve_source` checked it is refused."""
    root = tmp_path / "root"
    folder = root / "exports"
    folder.mkdir(parents=True)
    (folder / "cur.csv").write_text("a\n1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cur.csv").write_text("secret\n")
    folders = SourceFolders(sample_data=tmp_path / "samples", local_roots=(root,))
    checked = resolve_source(str(folder / "cur.csv"), {}, folders)

    fd = open_source(checked, folders, "cur.csv")
    try:
        assert Path(f"/dev/fd/{fd}").read_text() == "a\n1\n"
    finally:
        os.close(fd)

    folder.rename(root / "was")
    folder.symlink_to(elsewhere)  # a folder became a link
    with pytest.raises(SourceRefused, match="became a link"):
        open_source(checked, folders, "cur.csv")
    folder.unlink()
    folder.mkdir()
    (folder / "cur.csv").symlink_to(elsewhere / "cur.csv")  # the file became a link
    with pytest.raises(SourceRefused, match="became a link"):
        open_source(checked, folders, "cur.csv")
    (folder / "cur.csv").unlink()
    os.mkfifo(folder / "cur.csv")  # a pipe would block a reader
    with pytest.raises(SourceRefused, match="names a file that does not exist"):
        open_source(checked, folders, "cur.csv")
    with pytest.raises(SourceRefused, match="outside the allowed source folders"):
        open_source(str(elsewhere / "cur.csv"), folders, "cur.csv")


def test_a_source_read_by_a_cancelled_step_stays_open_until_the_read_ends(tmp_path: Path) -> None:
    """A step cancelled while a thread reads its source must not close the descriptor under
    the reader: the number could be given to another file (another tenant's source) before
    the reader opens `/dev/fd/N`."""
    (tmp_path / "cur.csv").write_text("a\n1\n")
    folders = SourceFolders(sample_data=tmp_path, local_roots=(tmp_path,))
    source = OpenedSource(open_source(str(tmp_path / "cur.csv"), folders, "cur.csv"))

    async def scenario() -> None:
        reading, finish = asyncio.Event(), asyncio.Event()

        async def reader(path: str) -> int:
            reading.set()
            await finish.wait()  # a thread still reading
            return os.stat(path).st_size

        step = asyncio.create_task(source.read(reader))
        await reading.wait()
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        source.close()
        os.fstat(source.fd)  # still open: the read goes on
        finish.set()
        for _ in range(100):
            await asyncio.sleep(0)
        with pytest.raises(OSError):
            os.fstat(source.fd)  # closed once it ended

    asyncio.run(scenario())


# -- parameters, labels, nested JSON ------------------------------------------------------------


def test_parameters_are_bounded(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    many = {f"p{i}": "1" for i in range(51)}
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"parameters": many}, "parameters", "must hold at most 50 parameters"),
        (
            {"parameters": {"size": "1" * 2049}},
            "parameters.size",
            "must be at most 2048 characters",
        ),
        ({"parameters": {"size": "\uff11\uff12"}}, "parameters.size", "must be an integer"),
        ({"parameters": {"size": "12\x00"}}, "parameters.size", HIDDEN),
        (
            {"parameters": {"colour": "red"}},
            "parameters.colour",
            "is not a parameter of this pipeline",
        ),
        ({"parameters": {"Size": "1"}}, "parameters", "'Size' is not a parameter of this pipeline"),
        (
            {"parameters": {"\x00": "1"}},
            "parameters",
            "'\\x00' is not a parameter of this pipeline",
        ),
        ({"trigger_by": "john\x00@acme.com"}, "trigger_by", HIDDEN),
        ({"trigger_by": "x" * 257}, "trigger_by", "must be at most 256 characters"),
    ]
    for body, field, issue in cases:
        assert_refused(post_trigger(api, key, tenant_id, SLOW, **body), field, issue)
    # A number within the template's bounds only (max_row_cost: min 0).
    negative = post_trigger(api, key, tenant_id, AWS, parameters={"max_row_cost": "-0.5"})
    assert_refused(negative, "parameters.max_row_cost", "must be at least 0")
    assert_nothing_spent(api, tenant_id, key)


@pytest.mark.parametrize(
    "parameters",
    [
        {"source_uri": {"x": {"y": 1}}},
        {"source_uri": {}},
        {"source_uri": [1, 2]},
        {"source_uri": 1},
        {"source_uri": True},
    ],
    ids=["nested object", "empty object", "array", "number", "boolean"],
)
def test_a_parameter_that_is_not_a_string_is_refused(
    api: httpx.Client, parameters: dict[str, object]
) -> None:
    """Envoy's transcoder encodes an object given for a map<string, string> value as a
    truncated map entry: the server must refuse the message it cannot parse, not fail."""
    tenant_id, key = onboard(api, plan=UNMETERED)
    response = post_trigger(api, key, tenant_id, AWS, parameters=parameters)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "Validation error"
    assert body["message"]
    assert set(body) <= {"error", "message", "details", "request_id"}
    # Named as the caller wrote it: the map, not Envoy's place of the entry in it.
    assert "[" not in body["details"]["field"], body
    assert body["details"]["field"] in ("parameters", "body"), body
    assert_nothing_spent(api, tenant_id, key)


# -- huge values ------------------------------------------------------------------------------


def test_huge_values_get_small_answers_over_rest(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    huge_name = "p" * HUGE  # once echoed whole into the trailers: a 503
    assert_refused(
        post_trigger(api, key, tenant_id, AWS, parameters={huge_name: "1"}), "parameters"
    )
    assert_refused(
        post_trigger(api, key, tenant_id, AWS, idempotency_key="k" * HUGE), "idempotency_key"
    )
    assert_refused(post_trigger(api, key, tenant_id, AWS, trigger_by="t" * HUGE), "trigger_by")
    for path in ("/api/v1/tenants/dryrun", "/api/v1/tenants/onboard"):
        response = api.post(path, json={**GUIDE_TENANT, "tenant_id": "a" * HUGE})
        assert_refused(response, "tenant_id", limit=SMALL_REPORT)
    long_id = "r" * LONG_IN_URL
    for method, path in (
        ("GET", f"/api/v1/pipelines/runs/{long_id}"),
        ("GET", f"/api/v1/pipelines/runs/{long_id}/steps"),
        ("POST", f"/api/v1/pipelines/runs/{long_id}:cancel"),
    ):
        response = api.request(
            method, path, headers=auth(key), json={} if method == "POST" else None
        )
        assert_refused(response, "pipeline_logging_id")
    response = post_trigger(api, key, "t" * LONG_IN_URL, AWS)
    assert_refused(response, "tenant_id")
    response = api.get(
        "/api/v1/pipelines/runs", params={"pipeline_id": "x" * LONG_IN_URL}, headers=auth(key)
    )
    assert_refused(response, "pipeline_id", "must be at most 256 characters")
    path = f"/api/v1/pipelines/run/{tenant_id}/{AWS}"
    header = {**auth(key), "Idempotency-Key": "k" * LONG_IN_URL}
    assert_refused(api.post(path, headers=header, json={}), "idempotency_key")
    # Beyond the headers Envoy accepts: refused at the edge, still small and JSON.
    assert_edge_refusal(api.get(f"/api/v1/pipelines/runs/{'r' * HUGE}", headers=auth(key)))
    header = {**auth(key), "Idempotency-Key": "k" * HUGE}
    assert_edge_refusal(api.post(path, headers=header, json={}))
    assert_nothing_spent(api, tenant_id, key)


def test_huge_values_get_small_answers_over_grpc(
    api: httpx.Client, grpc_channel: grpc.Channel
) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    target = {"provider": "aws", "domain": "cost", "template": "cost_usage"}
    huge = "h" * HUGE
    error = run_pipeline(grpc_channel, key, tenant_id=tenant_id, parameters={huge: "1"}, **target)
    assert [field for field, _ in grpc_refusal(error)] == ["parameters"]
    error = run_pipeline(grpc_channel, key, tenant_id=huge, **target)
    assert [field for field, _ in grpc_refusal(error)] == ["tenant_id"]
    error = run_pipeline(grpc_channel, key, tenant_id=tenant_id, idempotency_key=huge, **target)
    assert [field for field, _ in grpc_refusal(error)] == ["idempotency_key"]
    error = run_pipeline(
        grpc_channel, key, (("idempotency-key", huge),), tenant_id=tenant_id, **target
    )
    assert [field for field, _ in grpc_refusal(error)] == ["idempotency_key"]

    runs = run_service_pb2_grpc.RunServiceStub(grpc_channel)
    meta = {"metadata": [("x-api-key", key)]}
    calls = (
        lambda: runs.GetRun(run_service_pb2.GetRunRequest(pipeline_logging_id=huge), **meta),
        lambda: runs.ListRunSteps(
            run_service_pb2.ListRunStepsRequest(pipeline_logging_id=huge), **meta
        ),
        lambda: runs.CancelRun(run_service_pb2.CancelRunRequest(pipeline_logging_id=huge), **meta),
        lambda: list(
            runs.WatchRun(run_service_pb2.WatchRunRequest(pipeline_logging_id=huge), **meta)
        ),
    )
    for call in calls:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert [field for field, _ in grpc_refusal(raised.value)] == ["pipeline_logging_id"]
    with pytest.raises(grpc.RpcError) as raised:
        runs.ListRuns(run_service_pb2.ListRunsRequest(pipeline_id=huge), **meta)
    assert [field for field, _ in grpc_refusal(raised.value)] == ["pipeline_id"]

    tenants = tenant_service_pb2_grpc.TenantServiceStub(grpc_channel)
    with pytest.raises(grpc.RpcError) as raised:
        tenants.DryRunOnboarding(
            tenant_service_pb2.DryRunOnboardingRequest(**GUIDE_TENANT, tenant_id=huge)
        )
    assert ("tenant_id", "must match pattern ^[a-zA-Z0-9_]{3,50}$") in grpc_refusal(
        raised.value, limit=SMALL_REPORT
    )
    assert_nothing_spent(api, tenant_id, key)


# -- run ids ----------------------------------------------------------------------------------


def test_run_ids_must_be_run_ids(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    run_id = str(trigger(api, key, tenant_id, QUICK)["pipeline_logging_id"])
    for bad in ("not-a-run", quote("é", safe=""), quote(" ", safe=""), run_id + "0"):
        for method, path in (
            ("GET", f"/api/v1/pipelines/runs/{bad}"),
            ("GET", f"/api/v1/pipelines/runs/{bad}/steps"),
            ("GET", f"/api/v1/pipelines/runs/{bad}/checks"),
            ("GET", f"/api/v1/pipelines/runs/{bad}:watch"),
            ("POST", f"/api/v1/pipelines/runs/{bad}:cancel"),
        ):
            response = api.request(
                method, path, headers=auth(key), json={} if method == "POST" else None
            )
            assert_refused(response, "pipeline_logging_id")
    # A NUL byte in a path is refused at the edge already.
    assert_edge_refusal(api.get("/api/v1/pipelines/runs/%00", headers=auth(key)))
    # A run id in capitals is the same run; a well-formed id of no run is 404.
    upper = api.get(f"/api/v1/pipelines/runs/{run_id.upper()}", headers=auth(key))
    assert upper.status_code == 200, upper.text
    assert upper.json()["pipeline_logging_id"] == run_id
    missing = api.get(f"/api/v1/pipelines/runs/{uuid.uuid4()}", headers=auth(key))
    assert missing.status_code == 404
    assert missing.json()["error"] == "Not found"


# -- onboarding --------------------------------------------------------------------------------


def test_a_case_variant_does_not_reveal_the_existing_tenant_id(http: httpx.Client) -> None:
    """Two tenants spelled differently; each refusal of a case variant reads the same."""
    suffix = uuid.uuid4().hex[:8]
    existing = (f"Case_{suffix}_Mixed", f"case_{suffix}_lower")
    for tenant_id in existing:
        onboard(http, tenant_id)
    answers = []
    for tenant_id in existing:
        variant = tenant_id.upper()
        for path in ("/api/v1/tenants/dryrun", "/api/v1/tenants/onboard"):
            response = http.post(path, json={**GUIDE_TENANT, "tenant_id": variant})
            assert response.status_code == 409, response.text
            assert tenant_id not in response.text
            body = response.json()
            assert body["error"] == "Conflict"
            assert body["message"] == CASE_CONFLICT
            assert body["details"] == {
                "field": "tenant_id",
                "issue": "differs only in letter case from an existing tenant",
            }
            answers.append((path, response.text.replace(variant, "VARIANT")))
    assert answers[:2] == answers[2:]


# -- fuzzing ------------------------------------------------------------------------------------

PIECES = [
    "",
    "a",
    "0",
    "-1",
    "2025-11-18",
    "9999-12-31",
    "0001-01-01",
    "today",
    "\x00",
    "\n",
    "\u202e",
    "\u200b",
    "é",
    "租户",
    "😀",
    "\uff11",
    "\u0663",
    "%",
    "%ff",
    "../",
    "..",
    "/",
    "{sample_data}",
    "{date}",
    "'",
    '"',
    "\\",
    " ",
    "gs://",
    "file://",
    "x" * 300,
    "[" * 50,
]
LIMITS = ["-1", "0", "1", "1000", "1001", "2147483647", "2147483648", "-2147483649", "1e3", "x"]
STATUSES = ["COMPLETE", "complete", "7", "-1", "DONE", ""]
FUZZ_REQUESTS = 240


def fuzz_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 5)))


def fuzz_request(rng: random.Random, tenant_id: str) -> tuple[str, str, object]:
    """(method, path with query, JSON body or None) for one random request."""
    kind = rng.randrange(5)
    if kind == 0:
        query = {
            "limit": rng.choice(LIMITS),
            "status": rng.choice(STATUSES),
            "pipeline_id": fuzz_text(rng),
            "start_date": fuzz_text(rng),
            "end_date": fuzz_text(rng),
            "page_token": fuzz_text(rng),
        }
        chosen = {k: v for k, v in query.items() if rng.random() < 0.5}
        text = "&".join(
            f"{k}={quote(v, safe='%') if rng.random() < 0.2 else quote(v)}"
            for k, v in chosen.items()
        )
        return "GET", f"/api/v1/pipelines/runs?{text}", None
    if kind == 1:
        body = {
            "date": rng.choice(["", fuzz_text(rng)]),
            "trigger_by": fuzz_text(rng),
            "parameters": {
                rng.choice(["source_uri", "date", fuzz_text(rng)]): fuzz_text(rng)
                for _ in range(rng.randint(0, 2))
            },
            # Keeps every trigger from being created, after every other field is checked.
            "idempotency_key": "never valid",
        }
        template = rng.choice([AWS, "gcp/cost/cost_billing", f"{quote(fuzz_text(rng))}/y/z"])
        return "POST", f"/api/v1/pipelines/run/{tenant_id}/{template}", body
    if kind == 2:
        run_id = quote(fuzz_text(rng) or "x", safe="")
        suffix = rng.choice(["", "/steps", ":watch"])
        return "GET", f"/api/v1/pipelines/runs/{run_id}{suffix}", None
    if kind == 3:
        return "POST", f"/api/v1/pipelines/runs/{quote(fuzz_text(rng) or 'x', safe='')}:cancel", {}
    fields = {
        "tenant_id": fuzz_text(rng),
        "company_name": fuzz_text(rng),
        "admin_email": fuzz_text(rng),
        "subscription_plan": rng.choice(["PROFESSIONAL", fuzz_text(rng)]),
    }
    return "POST", "/api/v1/tenants/dryrun", fields


def test_random_input_never_reaches_a_server_error(http: httpx.Client) -> None:
    """A bounded, seeded fuzz over the REST surface: every answer is below 500, JSON, and
    nothing is created."""
    tenant_id, key = onboard(http)
    rng = random.Random(20251118)
    for _ in range(FUZZ_REQUESTS):
        method, path, body = fuzz_request(rng, tenant_id)
        response = http.request(method, path, headers=auth(key), json=body)
        assert response.status_code < 500, (method, path, body, response.text[:300])
        if response.status_code >= 400:
            assert response.json()["error"], (method, path, response.text[:300])
    assert_nothing_spent(http, tenant_id, key)
