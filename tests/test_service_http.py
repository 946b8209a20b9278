"""The HTTP service, end to end: a real uvicorn subprocess driven by a real HTTP client."""
import json
import sqlite3
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
pytest.importorskip("faiss")
httpx = pytest.importorskip("httpx")

from hybrid_kernels.service.process import ServerProcess  # noqa: E402

API_KEY = "test-key-0123456789"

KEY = {"X-API-Key": API_KEY}


def Server(db, *extra):
    return ServerProcess(db, API_KEY, "--default-model", "random", *extra)
DOCS = [{"title": "bako", "text": "bako was born in lima ."},
        {"title": "zizi", "text": "zizi plays the harp ."},
        {"title": "mudo", "text": "mudo works as a pilot ."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(str(tmp_path_factory.mktemp("svc") / "docs.db"), "--workers", "2", "--queue-limit", "2")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        r = c.post("/retention/update", json={"add": DOCS}, headers=KEY)
        assert r.status_code == 200, r.text
        yield c


def test_health_and_openapi(client):
    assert client.get("/health").json()["status"] == "ok"
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/query/hybrid", "/stream/query", "/retention/update", "/diffusion/generate",
              "/distillation/cascade", "/hybrid/stats", "/health"):
        assert p in paths


def test_query_returns_answer_passages_timings(client):
    r = client.post("/query/hybrid", json={"question": "where was bako born ?", "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str)
    assert len(body["passages"]) == 2
    assert body["passages"][0]["text"] == "bako was born in lima ."    # lexical match ranks first
    assert body["passages"][0]["score"] >= body["passages"][1]["score"]
    assert {"embed_query", "search", "generate", "total"} <= set(body["timings"])


def _sse_events(lines):
    """Parse SSE framing: 'event:' / 'data:' lines, blank line ends an event."""
    event, data = None, []
    for line in lines:
        if line.startswith(":"):
            continue
        if line == "":
            if event is not None or data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


def test_stream_sends_retrieval_then_tokens_then_done(client):
    with client.stream("POST", "/stream/query", json={"question": "what does mudo do for a living ?",
                                                      "top_k": 2, "max_new_tokens": 5}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(_sse_events(r.iter_lines()))
    kinds = [e for e, _ in events]
    assert kinds[0] == "retrieval" and kinds[-1] == "done"
    assert set(kinds[1:-1]) <= {"token"}
    first = json.loads(events[0][1])
    assert first["passages"][0]["text"] == "mudo works as a pilot ."
    assert json.loads(events[-1][1])["tokens"] == len(kinds) - 2 <= 5


def test_stream_disconnect_stops_the_work(client):
    with client.stream("POST", "/stream/query", json={"question": "where was bako born ?",
                                                      "max_new_tokens": 64}) as r:
        next(r.iter_lines())          # the retrieval event has started: leave
    deadline = time.monotonic() + 20
    while client.get("/hybrid/stats").json()["workers"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/hybrid/stats").json()["workers"]["in_flight"] == 0


def test_retention_add_is_searchable_and_remove_is_not(client):
    r = client.post("/retention/update", json={"add": [{"title": "quux", "text": "quux likes to eat paella ."}]},
                    headers=KEY)
    assert r.status_code == 200, r.text
    added = r.json()
    q = {"question": "what is the favorite food of quux ?", "top_k": 1}
    assert client.post("/query/hybrid", json=q).json()["passages"][0]["document_id"] == added["added_documents"][0]
    r = client.post("/retention/update", json={"remove_documents": added["added_documents"]}, headers=KEY)
    assert r.json()["removed_documents"] == 1 and r.json()["removed_segments"] == 1
    top = client.post("/query/hybrid", json=q).json()["passages"][0]
    assert top["document_id"] != added["added_documents"][0]


def test_remove_single_segment(client):
    added = client.post("/retention/update", json={"add": [{"text": "gone for good"}]}, headers=KEY).json()
    r = client.post("/retention/update", json={"remove_segments": added["added_segments"]}, headers=KEY)
    assert r.json()["removed_segments"] == 1


@pytest.mark.parametrize("headers,status", [({}, 401), ({"X-API-Key": "wrong"}, 403),
                                            ({"X-API-Key": API_KEY[:-1]}, 403)])
def test_mutation_needs_the_key(client, headers, status):
    before = client.get("/health").json()["documents"]
    r = client.post("/retention/update", json={"add": [{"text": "sneaky"}]}, headers=headers)
    assert r.status_code == status
    assert client.get("/health").json()["documents"] == before


def test_cascade_says_who_answered(client):
    r = client.post("/distillation/cascade", json={"question": "where was bako born ?", "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answered_by"] in ("student", "teacher")
    assert 0.0 <= body["confidence"] <= 1.0
    assert (body["answered_by"] == "student") == (body["confidence"] >= body["threshold"])


def test_diffusion_generates_documents(client):
    r = client.post("/diffusion/generate", json={"condition": "where was bako born ?",
                                                 "num_samples": 3, "num_steps": 4})
    assert r.status_code == 200, r.text
    docs = r.json()["documents"]
    assert len(docs) == 3 and all(isinstance(d, str) and "<" not in d for d in docs)


def test_stats(client):
    s = client.get("/hybrid/stats").json()
    assert s["documents"] >= 3 and s["segments"] == s["index_vectors"]
    assert s["index_bytes"] > 0 and s["memory"]["process_rss"] > 0
    assert s["latency_ms"]["/query/hybrid"]["p50"] > 0
    assert s["kernels"]["isa"] and s["workers"]["workers"] == 2


LONG = "x" * 20_001
BAD = [  # (endpoint, body, field named in the 422)
    ("/query/hybrid", {}, "question"),
    ("/query/hybrid", {"question": ""}, "question"),
    ("/query/hybrid", {"question": "   "}, "body"),
    ("/query/hybrid", {"question": "q" * 1001}, "question"),
    ("/query/hybrid", {"question": 5}, "question"),
    ("/query/hybrid", {"question": "q", "top_k": 0}, "top_k"),
    ("/query/hybrid", {"question": "q", "top_k": 21}, "top_k"),
    ("/query/hybrid", {"question": "q", "top_k": "many"}, "top_k"),
    ("/query/hybrid", {"question": "q", "max_new_tokens": 0}, "max_new_tokens"),
    ("/query/hybrid", {"question": "q", "max_new_tokens": 65}, "max_new_tokens"),
    ("/query/hybrid", {"question": "q", "unknown": 1}, "unknown"),
    ("/stream/query", {"question": "q", "top_k": -1}, "top_k"),
    ("/distillation/cascade", {"question": None}, "question"),
    ("/retention/update", {}, "body"),
    ("/retention/update", {"add": [{"text": ""}]}, "text"),
    ("/retention/update", {"add": [{"text": LONG}]}, "text"),
    ("/retention/update", {"add": [{"title": "t" * 201, "text": "ok"}]}, "title"),
    ("/retention/update", {"add": [{"text": "ok"}] * 65}, "add"),
    ("/retention/update", {"add": "not a list"}, "add"),
    ("/retention/update", {"remove_documents": ["one"]}, "remove_documents"),
    ("/retention/update", {"remove_segments": list(range(1001))}, "remove_segments"),
    ("/diffusion/generate", {"condition": ""}, "condition"),
    ("/diffusion/generate", {"condition": "c", "num_samples": 17}, "num_samples"),
    ("/diffusion/generate", {"condition": "c", "num_steps": 0}, "num_steps"),
    ("/diffusion/generate", {"condition": "c", "seed": -1}, "seed"),
]


@pytest.mark.parametrize("endpoint,body,field", BAD)
def test_bad_input_is_422_naming_the_field(client, endpoint, body, field):
    r = client.post(endpoint, json=body, headers=KEY)
    assert r.status_code == 422, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(field in loc for loc in locs), locs


def test_malformed_json_is_422(client):
    r = client.post("/query/hybrid", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_full_queue_is_503_not_a_timeout(client):
    """2 workers + 2 queued: a burst of 12 slow requests gets some 503s, the rest succeed."""
    body = {"condition": "where was bako born ?", "num_samples": 16, "num_steps": 64}
    codes = []

    def one():
        with httpx.Client(base_url=str(client.base_url), timeout=120.0) as c:
            codes.append(c.post("/diffusion/generate", json=body).status_code)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 2


def test_kill9_during_burst_keeps_every_acknowledged_write(tmp_path):
    db = str(tmp_path / "crash.db")
    srv = Server(db, "--workers", "2", "--queue-limit", "64")
    acked, stop = [], threading.Event()
    lock = threading.Lock()

    def writer(w):
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            i = 0
            while not stop.is_set():
                text = f"writer{w} record{i} marker"
                try:
                    r = c.post("/retention/update", json={"add": [{"title": f"w{w}", "text": text}]},
                               headers=KEY)
                except httpx.HTTPError:
                    return                      # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    with lock:
                        acked.append((r.json()["added_documents"][0], text))
                i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.kill()                                  # SIGKILL while writers are still sending
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 40
    with sqlite3.connect(db) as con:
        stored = dict(con.execute("SELECT id, text FROM documents"))
    missing = [(i, t) for i, t in acked if stored.get(i) != t]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"

    srv = Server(db, "--workers", "2")          # restart: the index is rebuilt from the store
    try:
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            assert c.get("/health").json()["documents"] == len(stored)
            doc_id, text = acked[-1]
            top = c.post("/query/hybrid", json={"question": text, "top_k": 1}).json()["passages"][0]
            assert top["document_id"] == doc_id
    finally:
        srv.stop()


def test_request_past_its_timeout_is_504_and_the_server_lives_on(tmp_path):
    srv = Server(str(tmp_path / "t.db"), "--workers", "1", "--timeout", "0.02")
    try:
        with httpx.Client(base_url=srv.url, timeout=60.0) as c:
            r = c.post("/diffusion/generate", json={"condition": "where was bako born ?",
                                                    "num_samples": 2, "num_steps": 16})
            assert r.status_code == 504 and "0.02" in r.json()["detail"]
            assert c.get("/health").status_code == 200
    finally:
        srv.stop()
