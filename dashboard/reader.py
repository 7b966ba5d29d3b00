"""The readers' side of a blinded reader study: one personal link per reader, nothing else.

Served apart from the dashboard (`fedsynth reader-study serve`): a reader's browser reaches only
their own images and their own progress, never the key, other readers' answers or any run folder.
Every answer is committed before the next image is shown.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from common.evaluation.reader_study import GUESSES, RATINGS, Study, StudyError

from .security import guard
from .templating import templates

HERE = Path(__file__).parent
NOT_VALID = "This link is not valid. Check that you copied the whole link you were sent, or ask the study coordinator for a new one."
USED_UP = "This link has been used: every image was rated and your answers are saved. Thank you."


def create_reader_app(study_path: str | os.PathLike, allowed_hosts: list[str] | None = None) -> FastAPI:
    study_path = Path(study_path)
    Study(study_path).close()  # fail at start, with the file's name, not at the first reader
    app = FastAPI(title="fedsynth reader study", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    guard(app, allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def bad_form(request: Request, exc: RequestValidationError):
        return page(request, "error.html", 400, code=400, message="That answer could not be read. Go back to your link and answer again.")

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        return page(request, "error.html", 503, code=503,
                    message="The study is not available right now; your answers so far are saved. Try your link again in a minute.")

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def refused(request: Request, message: str) -> HTMLResponse:
        return page(request, "error.html", 403, code=403, message=message)

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        return page(request, "error.html", 403, code=403, message="This server hosts a reader study. Open the personal link you were sent.")

    @app.get("/r/{token}", response_class=HTMLResponse)
    def item(request: Request, token: str, error: str | None = None):
        study = Study(study_path)
        try:
            reader = study.reader(token)
            if reader is None:
                return refused(request, NOT_VALID)
            nxt = study.next_item(reader)
            if reader.finished or nxt is None:
                return refused(request, USED_UP)
            position, public_id = nxt
            done = len(study.answered(reader))
            return page(request, "reader_item.html", token=token, public_id=public_id, done=done, total=len(reader.order),
                        ratings=RATINGS, error=error)
        finally:
            study.close()

    @app.get("/r/{token}/image/{public_id}.png")
    def image(request: Request, token: str, public_id: str):
        study = Study(study_path)
        try:
            reader = study.reader(token)
            png = study.image(reader, public_id) if reader is not None and not reader.finished else None
        finally:
            study.close()
        if png is None:
            return refused(request, NOT_VALID)
        return Response(png, media_type="image/png")

    @app.post("/r/{token}/answer")
    def answer(request: Request, token: str, item: str = Form(...), rating: int | None = Form(None),
               guess: str | None = Form(None), comment: str = Form("")):
        study = Study(study_path)
        try:
            reader = study.reader(token)
            if reader is None:
                return refused(request, NOT_VALID)
            if rating not in RATINGS or guess not in GUESSES:
                return RedirectResponse(f"/r/{token}?error=rating", status_code=303)
            try:
                study.answer(reader, item, rating, guess, comment.strip())
            except StudyError:
                return refused(request, NOT_VALID)
            # A repeated submit lands here too: the first answer stands, the reader moves on.
            finished = study.next_item(reader) is None
        finally:
            study.close()
        return RedirectResponse(f"/r/{token}/done" if finished else f"/r/{token}", status_code=303)

    @app.get("/r/{token}/done", response_class=HTMLResponse)
    def done(request: Request, token: str):
        study = Study(study_path)
        try:
            reader = study.reader(token)
            if reader is None:
                return refused(request, NOT_VALID)
            finished = study.next_item(reader) is None
        finally:
            study.close()
        if not finished:
            return RedirectResponse(f"/r/{token}", status_code=303)
        return page(request, "reader_done.html", total=len(reader.order))

    return app
