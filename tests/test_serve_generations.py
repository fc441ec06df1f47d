"""A running `duch serve` takes each new generation of its archive (add, remove) without a restart, and no answer
fails or mixes two generations."""
import json
import shutil
import threading
import time

import httpx
import pytest

from duch.pipeline.config import AddConfig, RemoveConfig, ServeConfig
from duch.pipeline.retrieval.search import Index
from duch.pipeline.serve.app import create_app
from duch.stages.add import add
from duch.stages.remove import remove

from .conftest import ASSETS, REAL_JPEGS, write_caption_json
from .serving import running

QUERY = {"id": "3", "k": 40, "modality": "image"}


def answer_of(run) -> list[str]:
    return [h.id for h in Index.load(run, bits=16, device="cpu").search(id="3", k=40, modality="image")]


@pytest.mark.slow
def test_a_running_service_takes_each_new_generation_without_a_failed_or_mixed_answer(encoded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    new = tmp_path / "new"
    (new / "images").mkdir(parents=True)
    for i in range(100, 106):
        shutil.copy(ASSETS / REAL_JPEGS[i % len(REAL_JPEGS)], new / "images" / f"{i}.jpg")
    write_caption_json(new, [{"filename": f"{i}.jpg", "classname": "harbor",
                              "sentences": [{"raw": f"a new harbor {i}"}, {"raw": f"harbor {i} from above"}]}
                             for i in range(100, 106)])
    expected = {0: answer_of(run)}
    seen, statuses, stop = [], [], threading.Event()

    def client(base):
        while not stop.is_set():
            response = httpx.post(f"{base}/api/search", json=QUERY, timeout=30)
            statuses.append(response.status_code)
            if response.status_code == 200:
                body = response.json()
                seen.append((body["generation"], [h["id"] for h in body["hits"]]))

    def wait_for(base, generation):
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/api/info").json()["archives"][0]["generation"] < generation:
            assert time.monotonic() < deadline, f"the service never took generation {generation}"
            time.sleep(0.05)

    with running(create_app(ServeConfig(run=str(run), bits=16, device="cpu", watch_interval=0.1))) as base:
        thread = threading.Thread(target=client, args=(base,))
        thread.start()
        try:
            time.sleep(0.5)
            add(AddConfig(run=str(run), data=str(new), device="cpu", workers=0), progress=False, echo=lambda _: None)
            expected[1] = answer_of(run)
            wait_for(base, 1)
            time.sleep(0.5)
            remove(RemoveConfig(run=str(run), ids=("100", "5")), echo=lambda _: None)
            expected[2] = answer_of(run)
            wait_for(base, 2)
            time.sleep(0.5)
        finally:
            stop.set()
            thread.join()
        info = httpx.get(f"{base}/api/info").json()["archives"][0]
        assert info["images"] == 24 + 6 - 2
        assert httpx.get(f"{base}/api/items/5").status_code == 404
    assert set(statuses) == {200}
    assert {g for g, _ in seen} == {0, 1, 2}
    assert all(ids == expected[g] for g, ids in seen)
    assert any(i in expected[1] for i in ("101", "102")) and "100" not in expected[2] and "5" not in expected[2]
    assert json.loads((run / "archive.json").read_text())["generation"] == 2
