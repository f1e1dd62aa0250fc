"""A search page over a finished run: pick a held-out image or upload one, see its nearest
neighbours (green: same class, red: another class) with their similarity and label, and the
run's metrics and plots. A FastAPI application; ``softtriple serve RUN`` runs it with uvicorn on
localhost.

It serves only the run's own files: test images by their index in the run's embeddings file,
plots by a bare file name inside RUN/plots. Uploads are capped in size and must decode as an
image. The neighbours come from a faiss index when faiss is installed, else the exact kNN.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from softtriple.experiment.run_folder import RunDir
from softtriple.search import EmbeddingIndex

MAX_UPLOAD_BYTES = 8 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000  # decoded size cap, read from the header before decoding: a
# 17.5 KB 1-bit PNG of 12,000 x 12,000 (under Pillow's own limit) took the server to 2.35 GB
MAX_K = 50
PICK = 48  # held-out images offered as queries on the front page
CSS = """body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cell{text-align:center;font-size:12px}
.cell img{width:112px;height:112px;object-fit:contain;border:4px solid #ccc;background:#fff}
.same img{border-color:#2a2}.other img{border-color:#d22}.query img{border-color:#27c}
td{padding:2px 10px}.error{color:#b00;font-weight:bold}"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>{body}</body></html>")


def create_app(run: str | Path, load_now: bool = False) -> Any:
    """The FastAPI application over the finished run in ``run``; ``load_now`` loads its model
    at once (else on the first upload)."""
    run_dir = RunDir(run)
    results = run_dir.read_results()
    neighbours = EmbeddingIndex.load(run_dir.embeddings)
    embeddings, labels, paths = neighbours.embeddings, neighbours.labels, neighbours.paths
    names: list[str | None] = [None] * len(paths) if neighbours.names is None \
        else list(neighbours.names)

    def label(i: int) -> str:  # the class's label and name, safe in HTML
        return "class " + html.escape(neighbours.label_text(i))
    state: dict[str, Any] = {}
    app = FastAPI(title=f"softtriple: {run_dir.root.name}")

    def model() -> Any:
        if "model" not in state:
            from softtriple.inference import load_model

            state["model"], state["config"], _ = load_model(run_dir.root)
        return state["model"], state["config"]

    def cell(i: int, css: str, caption: str) -> str:
        return (f"<a class='cell {css}' href='/query/{i}'><img src='/image/{i}' alt='image {i}'>"
                f"<br>{caption}</a>")

    def results_page(query_html: str, hits: list[tuple[int, float]],
                     query_label: int | None) -> str:
        cells = []
        for i, sim in hits:
            same = query_label is not None and int(labels[i]) == query_label
            css = "same" if same else ("other" if query_label is not None else "")
            cells.append(cell(i, f"hit {css}", f"{sim:.3f} &middot; {label(i)}"))
        return _page("neighbours", f"<p><a href='/'>&larr; all queries</a></p><h2>Query</h2>"
                     f"{query_html}<h2>{len(hits)} nearest neighbours ({neighbours.backend})"
                     f"</h2><div class='grid' id='neighbours'>{''.join(cells)}</div>")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
                       for k, v in results["metrics"].items() if isinstance(v, float))
        plots = sorted(p.name for p in run_dir.plots.glob("*.png")) if run_dir.plots.is_dir() \
            else []
        links = " ".join(f"<a href='/plots/{html.escape(n)}'>{html.escape(n)}</a>" for n in plots)
        step = max(1, len(paths) // PICK)
        picks = "".join(cell(i, "pick", f"#{i} {label(i)}")
                        for i in range(0, len(paths), step)[:PICK])
        return _page(f"softtriple run {run_dir.root.name}", f"""
<h1>softtriple run: {html.escape(run_dir.root.name)}</h1>
<h2>Metrics on held-out classes</h2><table>{rows}</table><p>Plots: {links or 'none'}</p>
<h2>Upload an image</h2><form action='/upload' method='post' enctype='multipart/form-data'>
<input type='file' name='file' accept='image/*'> <input type='submit' value='Search'></form>
<h2>Or pick one of {len(paths)} held-out images</h2><div class='grid' id='picks'>{picks}</div>""")

    def checked_index(i: int) -> int:
        if not 0 <= i < len(paths):
            raise HTTPException(404, f"no test image {i}; valid: 0..{len(paths) - 1}")
        return i

    @app.get("/query/{i}", response_class=HTMLResponse)
    def query(i: int, k: int = Query(8, ge=1, le=MAX_K)) -> str:
        hits = neighbours.search(embeddings[checked_index(i)], min(k, len(paths) - 1), exclude=i)
        return results_page(cell(i, "query", f"#{i} {label(i)}"), hits, int(labels[i]))

    @app.get("/api/neighbours/{i}")
    def api_neighbours(i: int, k: int = Query(8, ge=1, le=MAX_K)) -> JSONResponse:
        hits = neighbours.search(embeddings[checked_index(i)], min(k, len(paths) - 1), exclude=i)
        return JSONResponse({"query": i, "label": int(labels[i]), "name": names[i],
                             "neighbours": [{"index": j, "similarity": s, "label": int(labels[j]),
                                             "name": names[j]} for j, s in hits]})

    @app.get("/image/{i}")
    def image(i: int) -> FileResponse:
        path = Path(paths[checked_index(i)])
        if not path.is_file():
            raise HTTPException(404, f"test image {i} ({path.name}) is no longer on disk")
        return FileResponse(path)

    @app.get("/plots/{name}")
    def plot(name: str) -> FileResponse:
        folder = run_dir.plots.resolve()
        path = (folder / name).resolve()
        if "/" in name or path.parent != folder or path.suffix != ".png" or not path.is_file():
            raise HTTPException(404, "no such plot")
        return FileResponse(path)

    @app.post("/upload", response_class=HTMLResponse)
    async def upload(file: UploadFile = File(...),  # noqa: B008
                     k: int = Query(8, ge=1, le=MAX_K)) -> str:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        from PIL import Image, UnidentifiedImageError

        try:
            picture = Image.open(io.BytesIO(data))
            width, height = picture.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise HTTPException(413, f"{file.filename or 'the upload'} is {width} x {height} "
                                         f"pixels, over the {MAX_UPLOAD_PIXELS:,} this page "
                                         f"decodes; upload a smaller image")
            picture.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError,
                ValueError) as error:
            raise HTTPException(400, f"{file.filename or 'the upload'} is not an image "
                                     f"({error.__class__.__name__}); upload a PNG or JPEG"
                                ) from error
        from softtriple.inference import embed_pil

        net, config = model()
        query_vector = embed_pil(net, config, picture)  # cropped to MAX_ASPECT : 1, then RGB
        shown = base64.b64encode(data).decode()
        kind = picture.get_format_mimetype() or "image/png"
        query_html = (f"<div class='cell query'><img src='data:{kind};base64,{shown}' "
                      f"alt='upload'><br>{html.escape(file.filename or 'upload')}</div>")
        return results_page(query_html, neighbours.search(query_vector, min(k, len(paths))), None)

    if load_now:
        model()
    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000,
          ready: Callable[[], None] = lambda: None) -> None:
    """Run the search page with uvicorn until interrupted. The run is read and its model loaded
    before anything is served (a damaged run is refused at the start, not per request); a port
    that cannot be bound is one ValueError."""
    import socket

    import uvicorn

    app = create_app(run, load_now=True)
    try:  # bind once here: uvicorn reports a taken port as a log line and sys.exit
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose "
                         f"another --port or --host") from error
    ready()
    uvicorn.run(app, host=host, port=port, log_level="warning")
