"""softtriple serve: the search page over a finished run, at the HTTP level (FastAPI's test
client) and in a real browser (Playwright driving Debian's chromium, which `make sources`
installs)."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from softtriple.evaluation import knn
from softtriple.run import RunDir, read_embeddings
from softtriple.serve import MAX_UPLOAD_BYTES, create_app
from test_training import tiny


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    from softtriple.training import Trainer

    folder = tmp_path_factory.mktemp("serve") / "run"
    Trainer(tiny(folder, "schedule.epochs=1", "evaluation.before_training=false",
                 "evaluation.metrics=[recall]")).train()
    (folder / "plots").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "plots" / "curves.png")
    return folder


@pytest.fixture(scope="module")
def client(run):
    return TestClient(create_app(run))


def _png(size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)
                    ).save(buffer, "PNG")
    return buffer.getvalue()


def test_pages_show_the_metrics_and_the_exact_neighbours(run, client):
    page = client.get("/")
    assert page.status_code == 200 and "recall@1" in page.text and "/plots/curves.png" in page.text
    embeddings, labels, _ = read_embeddings(RunDir(run).embeddings)
    _, expected = knn(embeddings, 6)
    got = client.get("/api/neighbours/3?k=6").json()
    assert [n["index"] for n in got["neighbours"]] == expected[3].tolist()
    paths = read_embeddings(RunDir(run).embeddings)[2]
    assert got["name"] == Path(paths[3]).parent.name  # the class's folder name
    assert all(n["name"] == Path(paths[n["index"]]).parent.name for n in got["neighbours"])
    assert [n["label"] for n in got["neighbours"]] == labels[expected[3].numpy()].tolist()
    html = client.get("/query/3?k=6").text
    assert html.count("class='cell hit") == 6
    same = sum(int(labels[j]) == int(labels[3]) for j in expected[3].tolist())
    assert html.count("hit same") == same and html.count("hit other") == 6 - same
    assert client.get("/image/3").headers["content-type"].startswith("image/")


def test_upload_finds_neighbours_and_bad_uploads_are_refused(client):
    good = client.post("/upload", files={"file": ("q.png", _png(), "image/png")})
    assert good.status_code == 200 and good.text.count("class='cell hit") == 8
    text = client.post("/upload", files={"file": ("notes.png", b"not an image", "image/png")})
    assert text.status_code == 400 and "notes.png is not an image" in text.json()["detail"]
    big = client.post("/upload", files={"file": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1),
                                                 "image/png")})
    assert big.status_code == 413 and "larger than" in big.json()["detail"]
    bomb = io.BytesIO()  # 12,000 x 12,000 1-bit: a few KB that decode to 144 M pixels
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000
    refused = client.post("/upload", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    assert refused.status_code == 413 and "12000 x 12000 pixels" in refused.json()["detail"]


@pytest.mark.parametrize("path", ["/plots/../config.yaml", "/plots/%2e%2e%2fconfig.yaml",
                                  "/plots/..%2Fresults.json", "/plots/%2Fetc%2Fpasswd",
                                  "/image/99999", "/image/-1", "/query/99999",
                                  "/api/neighbours/0?k=0", "/api/neighbours/0?k=1000"])
def test_only_the_runs_own_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code in (404, 422), (path, response.status_code)
    assert "softtriple" not in response.text or response.status_code == 422


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="no chromium: `make sources` installs Debian's (the browser test)")
def test_a_browser_picks_a_query_and_reads_its_neighbours(run):
    sync_api = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "softtriple", "serve", str(run),
                               "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):  # the server imports torch first
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                 args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            assert "softtriple run" in page.title()
            page.locator("#picks a").nth(2).click()
            page.wait_for_selector("#neighbours")
            hits = page.locator("#neighbours .hit")
            assert hits.count() == 8
            captions = hits.all_inner_texts()
            assert all("class" in c for c in captions)
            # every neighbour's picture arrives and decodes (waited for: on a loaded machine the
            # server answers the image requests after the page itself)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#neighbours img')].every("
                "e => e.complete && e.naturalWidth > 0)", timeout=60_000)
            images = page.locator("#neighbours img")
            assert images.count() == 8
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_search_index_without_faiss_gives_the_same_neighbours(run, monkeypatch):
    from softtriple.search import EmbeddingIndex

    embeddings, labels, paths = read_embeddings(RunDir(run).embeddings)
    with_faiss = EmbeddingIndex(embeddings, labels, paths)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    exact = EmbeddingIndex(embeddings, labels, paths)
    assert exact.backend == "exact kNN"
    for i in (0, 7):
        got = exact.search(embeddings[i], 5, exclude=i)
        expected = with_faiss.search(embeddings[i], 5, exclude=i)
        assert [j for j, _ in got] == [j for j, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
