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
from softtriple.experiment.run_folder import RunDir, read_embeddings
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


def _rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.parametrize("size", [(40_000_000, 1), (2_000_000, 20), (1, 40_000_000)])
def test_an_image_of_any_shape_grows_the_server_by_less_than_100_mb(client, size):
    """Under the pixel cap but absurdly long: 1-bit PNGs of a few KB. The resize to the model's
    size would ask for GBs (64 x 2.56e9 pixels for 40,000,000 x 1); the central region kept
    (16 : 1) makes it a few KB, and the page answers as for any image."""
    import gc

    picture = io.BytesIO()
    Image.new("1", size, 1).save(picture, format="PNG")
    assert len(picture.getvalue()) < 200_000
    client.post("/upload", files={"file": ("q.png", _png(), "image/png")})  # model loaded
    gc.collect()
    before = _rss_mib()
    answer = client.post("/upload", files={"file": ("long.png", picture.getvalue(),
                                                    "image/png")})
    grown = _rss_mib() - before
    assert answer.status_code == 200 and answer.text.count("class='cell hit") == 8
    assert grown < 100, f"the server grew by {grown:.0f} MB"


def test_the_central_region_embeds_as_the_whole_long_image(run):
    """Cropping to 16 : 1 keeps every pixel the test transform's centre crop uses: the
    embedding of a 40 : 1 image equals the uncropped one's to the resize's rounding."""
    import torch

    from softtriple.data import eval_transform
    from softtriple.inference import embed_pil, load_model

    model, config, _ = load_model(run)
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 255, (8, 320, 3), np.uint8)).resize((1280, 32))
    tensor = eval_transform(config.data.image_size, model.interpolation)(wide)
    with torch.no_grad():
        whole = model.eval()(tensor[None]).numpy()[0]
    np.testing.assert_allclose(embed_pil(model, config, wide), whole, atol=2e-2)
    np.testing.assert_allclose(embed_pil(model, config, wide.convert("1")),
                               embed_pil(model, config, wide.convert("1").convert("RGB")),
                               atol=2e-2)


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
