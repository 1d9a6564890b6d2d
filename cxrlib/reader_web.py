"""The reader study as a small web app: readers get a link, not Jupyter.

A *study folder* is made once from a finished run (:func:`prepare_from_run`, or
:func:`prepare_study` from pools of manifest rows) and can be copied to the machine that
serves it::

    study/
      study.json     settings: session name, seed, number of images, display sizes, generators
      pool.csv       image_id, image (opaque id), generator, truth, label: the pools sequences draw from
      images/        <opaque id>.png: every pooled image as the reader sees it (shrunk to the common
                     size, enlarged to the display size, no metadata), named by a random id
      answers/       written while serving: <reader>__<session>.csv (the answer files of
                     :mod:`cxrlib.reader_study`), <reader>__<session>__sequence.csv, readers.json
      token          the link's secret (kept so a restarted server accepts the same links)

:func:`start_server` serves it with the standard library's threading HTTP server (a study has a
handful of readers; no dependency to install, nothing to configure). Every request carries the
study token (``?token=``); every reader gets the session's images (drawn by
:func:`cxrlib.reader_study.make_sequence` from the study's seed) in an order seeded by their name,
and a reader key that the page keeps in its address (``#reader=..&key=..``), so a reload or a
server restart resumes where the answer file stops and nobody else can open that session (a lost
address: :meth:`ReaderStudy.reissue`, ``python -m cxrlib reader link``). Each
click goes through :meth:`cxrlib.reader_study.ReaderSession.answer` (fsynced before the next
image). Scores come back only once the reader's sequence is done, and only to that reader.
Images are looked up by opaque id in a table made at start-up: no part of a request becomes a
file path. :func:`export_answers` copies the answer files to a folder that notebook 06 reads
with :func:`cxrlib.reader_study.collect_answers`. How to run a study: ``docs/reader_study.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import os
import secrets
import shutil
import sys
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd

from cxrlib import reader_study as rs
from cxrlib.runs import read_json, write_json
from cxrlib.stages.table import stage_path

STUDY_FILE = "study.json"
POOL_FILE = "pool.csv"
IMAGES_DIR = "images"
ANSWERS_DIR = "answers"
READERS_FILE = "readers.json"
TOKEN_FILE = "token"
POOL_COLUMNS: tuple[str, ...] = ("image_id", "image", "generator", "truth", "label")
DEFAULT_PORT = 8866
MAX_BODY_BYTES = 4096
MAX_NAME_LENGTH = 40
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StudySettings:
    """What a study folder's ``study.json`` holds: enough to redraw every reader's sequence."""

    session: str
    n_images: int
    seed: int
    image_size: int
    display_size: int = 256
    generators: tuple[str, ...] = ()
    source: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format: int = FORMAT_VERSION

    @classmethod
    def read(cls, study_dir: str | os.PathLike) -> StudySettings:
        path = Path(study_dir) / STUDY_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: not a study folder (make one with "
                "'python -m cxrlib reader prepare')"
            )
        values = read_json(path)
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown or values.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: unknown keys {sorted(unknown)} or format {values.get('format')!r} "
                f"(expected {FORMAT_VERSION})"
            )
        values["generators"] = tuple(values.get("generators", ()))
        return cls(**values)


# ----------------------------------------------------------------------------- prepare


def prepare_study(
    out: str | os.PathLike,
    real: pd.DataFrame,
    synthetic: Mapping[str, pd.DataFrame],
    *,
    n_images: int,
    seed: int,
    session: str,
    image_size: int,
    display_size: int = 256,
    source: str = "",
) -> Path:
    """Write a self-contained study folder ``out`` (must not exist or be empty); returns it.

    ``real`` / ``synthetic``: pools as for :func:`cxrlib.reader_study.make_sequence` (rows with
    ``image_id``, absolute ``path``, optionally ``label``). The sequence length is
    :func:`cxrlib.reader_study.fitting_length` of ``n_images``; every pooled image is written as
    :func:`cxrlib.reader_study.prepare_image` shows it (``(display_size, display_size)`` uint8
    PNG) under a random opaque name. Raises ``ValueError`` when the pools cannot fill a sequence.
    """
    from cxrlib.data.io import write_png

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not an empty folder; a study is prepared once "
            "(choose a new folder)"
        )
    session = rs._check_name("session", session)
    length = rs.fitting_length(n_images, real, synthetic)
    if length < 2:
        sizes = {"real": len(real), **{name: len(rows) for name, rows in synthetic.items()}}
        raise ValueError(
            f"the pools {sizes} cannot fill a reader sequence (need real images and "
            "synthetic images of every generator)"
        )
    ids = pd.concat([real["image_id"], *(rows["image_id"] for rows in synthetic.values())]).astype(
        str
    )
    if ids.duplicated().any():
        raise ValueError(f"image ids repeat across pools: {ids[ids.duplicated()].tolist()[:5]}")
    rows = []
    try:
        for generator, pool, truth in [(rs.REAL, real, rs.REAL)] + [
            (name, pool, rs.SYNTHETIC) for name, pool in synthetic.items()
        ]:
            for record in pool.to_dict("records"):
                opaque = secrets.token_hex(8)
                write_png(
                    out / IMAGES_DIR / f"{opaque}.png",
                    rs.prepare_image(record["path"], image_size, display_size),
                )
                rows.append(
                    {
                        "image_id": str(record["image_id"]),
                        "image": opaque,
                        "generator": generator,
                        "truth": truth,
                        "label": str(record.get("label", "")),
                    }
                )
    except BaseException:
        shutil.rmtree(out / IMAGES_DIR, ignore_errors=True)  # a half-written study is no study
        raise
    pool_frame = pd.DataFrame(rows, columns=list(POOL_COLUMNS))
    from cxrlib.runs import atomic_write

    text = pool_frame.to_csv(index=False, lineterminator="\n")
    atomic_write(out / POOL_FILE, lambda stream: stream.write(text), mode="w")
    settings = StudySettings(
        session=session,
        n_images=length,
        seed=int(seed),
        image_size=int(image_size),
        display_size=int(display_size),
        generators=tuple(synthetic),
        source=str(source),
    )
    write_json(out / STUDY_FILE, asdict(settings))
    return out


def run_stage_dir(run_dir: str | os.PathLike) -> Path:
    """The folder of notebook 06 in a run (``run_dir`` itself when it holds the stage's manifest)."""
    run_dir = Path(run_dir)
    candidates = [run_dir, stage_path(run_dir, "06")]
    for folder in candidates:
        if (folder / "manifest.csv").is_file() and (folder / "params.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no finished notebook 06 in {run_dir}: looked for manifest.csv and params.json in "
        f"{[str(c) for c in candidates]}"
    )


def run_pools(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Notebook 06's pools from its manifest: real COVID-19 images of the validation and test splits
    (never trained on) and, per generator found in ``origin`` (diffusion first, then the CycleGAN
    translators), its COVID-19 images; paths made absolute (:func:`cxrlib.reader_study.image_pool`)."""
    from cxrlib.data import manifest as mf
    from cxrlib.stages import cyclegan as syn

    real = rs.image_pool(syn.real_rows(manifest, ["val", "test"], ["covid"]), manifest)
    origins = manifest["origin"].astype(str)
    names = {
        mf.parse_origin(origin)[0] for origin in origins.unique() if origin not in ("", mf.REAL)
    }
    order = [name for name in ("diffusion", *syn.TRANSLATORS) if name in names] + sorted(
        names - {"diffusion", *syn.TRANSLATORS}
    )
    pools = {}
    for name in order:
        rows = syn.synthetic_rows(manifest, name)
        rows = rows[rows["label"].astype(str) == "covid"]
        if len(rows):
            pools[name] = rs.image_pool(rows, manifest)
    return real, pools


def prepare_from_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n_images: int | None = None,
    seed: int | None = None,
    session: str | None = None,
    image_size: int | None = None,
    display_size: int = 256,
    allowed_roots: Sequence[str | os.PathLike] = (),
) -> Path:
    """:func:`prepare_study` on the pools of a finished notebook 06 (:func:`run_pools`); settings not
    given come from the stage's ``params.json`` (``READER_IMAGES``, ``SEED``, ``READER_SESSION``,
    ``IMAGE_SIZE``), so the study shows the images of the notebook's scripted reader.
    ``allowed_roots``: data folders outside the run and the project's data folder that the stage
    manifest may point into (:func:`cxrlib.data.manifest.read_manifest`)."""
    from cxrlib.data import manifest as mf

    stage = run_stage_dir(run_dir)
    params = read_json(stage / "params.json").get("params", {})
    trusted = {"allowed_roots": list(allowed_roots)} if allowed_roots else {}
    manifest = mf.read_manifest(stage / "manifest.csv", **trusted)
    real, pools = run_pools(manifest)
    if not pools:
        raise ValueError(
            f"{stage / 'manifest.csv'}: no synthetic COVID-19 images (no generator rows)"
        )

    def pick(given: Any, name: str, default: Any) -> Any:
        return given if given is not None else params.get(name, default)

    return prepare_study(
        out,
        real,
        pools,
        n_images=int(pick(n_images, "READER_IMAGES", 40)),
        seed=int(pick(seed, "SEED", 0)),
        session=str(pick(session, "READER_SESSION", "study")),
        image_size=int(pick(image_size, "IMAGE_SIZE", 256)),
        display_size=display_size,
        source=str(stage.resolve()),
    )


# ----------------------------------------------------------------------------- the study being served


class AccessDenied(Exception):
    """A request that names a reader it may not open (unknown, taken, or a wrong key)."""


class StaleAnswer(Exception):
    """An answer to a trial that is no longer the current one (a double click, an old tab)."""


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ReaderStudy:
    """A study folder being served: sequences, reader keys and sessions (thread-safe).

    Every reader of the study answers the images of one sequence
    (:func:`cxrlib.reader_study.make_sequence` with the study's seed), in an order seeded by the
    study seed and the reader's name, saved as the reader's own sequence file.
    """

    def __init__(self, study_dir: str | os.PathLike) -> None:
        self.folder = Path(study_dir)
        self.settings = StudySettings.read(self.folder)
        pool_path = self.folder / POOL_FILE
        pool = pd.read_csv(pool_path, dtype=str, keep_default_na=False)
        if tuple(pool.columns) != POOL_COLUMNS:
            raise ValueError(
                f"{pool_path}: columns {list(pool.columns)} instead of {list(POOL_COLUMNS)}"
            )
        if not pool["image"].str.fullmatch(r"[0-9a-f]{16}").all():
            raise ValueError(f"{pool_path}: an 'image' value is not a 16-hex opaque id")
        pool["path"] = [f"{IMAGES_DIR}/{opaque}.png" for opaque in pool["image"]]
        real = pool[pool["generator"] == rs.REAL]
        synthetic = {name: pool[pool["generator"] == name] for name in self.settings.generators}
        self.sequence = rs.make_sequence(
            real, synthetic, n_images=self.settings.n_images, seed=self.settings.seed
        )
        self._opaque = dict(zip(pool["image_id"], pool["image"], strict=True))
        # the only images a request can reach: those of the sequence, by opaque id
        self._images = {
            self._opaque[image_id]: self.folder / IMAGES_DIR / f"{self._opaque[image_id]}.png"
            for image_id in self.sequence["image_id"]
        }
        missing = [str(path) for path in self._images.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of the sequence are missing, e.g. {missing[0]}"
            )
        self.answers_dir = self.folder / ANSWERS_DIR
        self.answers_dir.mkdir(exist_ok=True)
        registry = self.answers_dir / READERS_FILE
        self._readers: dict[str, dict[str, str]] = read_json(registry) if registry.is_file() else {}
        self._sessions: dict[str, rs.ReaderSession] = {}
        self._lock = threading.Lock()

    @property
    def readers(self) -> list[str]:
        return sorted(self._readers)

    def reader_sequence(self, reader: str) -> pd.DataFrame:
        """The study's images in this reader's order (trials renumbered 1..n)."""
        rng = np.random.default_rng([self.settings.seed, zlib.crc32(reader.encode()), 1717])
        ordered = self.sequence.iloc[rng.permutation(len(self.sequence))].reset_index(drop=True)
        return ordered.assign(trial=np.arange(1, len(ordered) + 1))

    def _session(self, reader: str) -> rs.ReaderSession:
        if reader not in self._sessions:
            self._sessions[reader] = rs.ReaderSession(
                self.answers_dir,
                reader,
                self.settings.session,
                self.reader_sequence(reader),
                own_sequence=True,
            )
        return self._sessions[reader]

    def start(self, reader: str) -> tuple[str, dict[str, Any]]:
        """Register a new reader: ``(key, state)``. A name already taken raises :class:`AccessDenied`."""
        reader = str(reader).strip()
        if len(reader) > MAX_NAME_LENGTH:
            raise ValueError(f"reader name longer than {MAX_NAME_LENGTH} characters")
        reader = rs._check_name("reader", reader)
        with self._lock:
            self._reload_registry()  # 'reader link' may have changed it
            answer_file, _ = rs.session_paths(
                self.answers_dir, reader, self.settings.session, own_sequence=True
            )
            if reader in self._readers or answer_file.exists():
                raise AccessDenied(
                    f"the reader name {reader!r} is taken; choose another, or open your own "
                    "link to continue"
                )
            key = secrets.token_urlsafe(18)
            self._readers[reader] = {
                "key_sha256": _key_hash(key),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            write_json(self.answers_dir / READERS_FILE, self._readers)
            return key, self._state(self._session(reader))

    def _reload_registry(self) -> None:
        registry = self.answers_dir / READERS_FILE
        self._readers = read_json(registry) if registry.is_file() else {}

    def _key_matches(self, reader: str, key: Any) -> bool:
        entry = self._readers.get(reader)
        return (
            entry is not None
            and isinstance(key, str)
            and hmac.compare_digest(_key_hash(key), entry["key_sha256"])
        )

    def _open(self, reader: Any, key: Any) -> rs.ReaderSession:
        reader = str(reader)
        if not self._key_matches(reader, key):
            self._reload_registry()  # a key reissued by 'reader link' is on disk only
            if not self._key_matches(reader, key):
                raise AccessDenied("unknown reader or wrong reader key")
        return self._session(reader)

    def reissue(self, reader: str) -> str:
        """A new key for a reader who lost their page address (the old key stops working)."""
        with self._lock:
            self._reload_registry()
            if reader not in self._readers:
                raise KeyError(f"no reader {reader!r} in this study; readers: {self.readers}")
            key = secrets.token_urlsafe(18)
            self._readers[reader]["key_sha256"] = _key_hash(key)
            write_json(self.answers_dir / READERS_FILE, self._readers)
            return key

    def state(self, reader: Any, key: Any) -> dict[str, Any]:
        """Where this reader stands: ``n``, ``answered``, ``done``; the current ``trial`` and its opaque
        ``image`` id, or (once done) ``scores``. Raises :class:`AccessDenied` for a wrong key."""
        with self._lock:
            return self._state(self._open(reader, key))

    def answer(
        self,
        reader: Any,
        key: Any,
        trial: Any,
        answer: Any,
        *,
        confidence: Any = None,
        class_answer: Any = None,
        seconds: Any = None,
    ) -> dict[str, Any]:
        """Record ``answer`` to ``trial`` (must be the current one, else :class:`StaleAnswer`); new state."""
        with self._lock:
            session = self._open(reader, key)
            current = session.current()
            if current is None or str(trial) != str(current["trial"]):
                raise StaleAnswer(f"trial {trial} is not the current one")
            if class_answer not in (None, "", "normal", "pneumonia", "covid"):
                raise ValueError(f"class {class_answer!r} is not normal, pneumonia or covid")
            try:
                seconds = None if seconds is None else min(max(float(seconds), 0.0), 86400.0)
                confidence = None if confidence in (None, "") else int(confidence)
            except (TypeError, ValueError):
                raise ValueError("seconds and confidence must be numbers") from None
            session.answer(
                str(answer),
                class_answer=class_answer or None,
                confidence=confidence,
                seconds=seconds,
            )
            return self._state(session)

    def _state(self, session: rs.ReaderSession) -> dict[str, Any]:
        trial = session.current()
        state: dict[str, Any] = {
            "reader": session.reader,
            "n": len(session),
            "answered": session.n_answered,
            "done": trial is None,
        }
        if trial is None:
            state["scores"] = reader_scores(session.answers)
        else:
            state.update(trial=int(trial["trial"]), image=self._opaque[trial["image_id"]])
        return state

    def image_path(self, opaque: str) -> Path | None:
        """The file of an image of the sequence, or ``None`` for any other id (a dict lookup only)."""
        return self._images.get(opaque)


def reader_scores(answers: pd.DataFrame) -> list[dict[str, Any]]:
    """A reader's score table as rows ``{measure, value, low, high, n}``: accuracy, sensitivity,
    specificity, then each generator's rate (:func:`cxrlib.reader_study.score_answers`)."""
    scores = rs.score_answers(answers)
    rows = [
        {
            "measure": name,
            "value": scores[name],
            "low": scores[f"{name}_ci95"][0],
            "high": scores[f"{name}_ci95"][1],
            "n": scores[f"{name}_n"],
        }
        for name in ("accuracy", "sensitivity", "specificity")
    ]
    for generator, values in scores["per_generator"].items():
        rows.append(
            {
                "measure": f"{values['measure']} ({generator})",
                "value": values["rate"],
                "low": values["ci95"][0],
                "high": values["ci95"][1],
                "n": values["n"],
            }
        )
    return rows


def export_answers(study_dir: str | os.PathLike, to: str | os.PathLike) -> list[Path]:
    """Copy every reader's answer file (and sequence file) of a study into ``to`` (e.g. notebook 06's
    ``reader_study`` folder, read by :func:`cxrlib.reader_study.collect_answers`); returns the answer
    files copied. A different file of the same name already in ``to`` raises ``FileExistsError``."""
    settings = StudySettings.read(study_dir)
    source, to = Path(study_dir) / ANSWERS_DIR, Path(to)
    to.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.glob(f"*__{settings.session}.csv")) + sorted(
        source.glob(f"*__{settings.session}__sequence.csv")
    ):
        target = to / path.name
        if target.exists() and target.read_bytes() != path.read_bytes():
            raise FileExistsError(f"{target} exists with other content; export to an empty folder")
        shutil.copyfile(path, target)
        if not path.name.endswith("__sequence.csv"):
            copied.append(target)
    return copied


# ----------------------------------------------------------------------------- HTTP


def study_token(study_dir: str | os.PathLike, *, new: bool = False) -> str:
    """The study's link secret: read from ``<study>/token``, made (random, 128 bits) when missing or ``new``."""
    path = Path(study_dir) / TOKEN_FILE
    if path.is_file() and not new:
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(16)
    from cxrlib.runs import atomic_write

    atomic_write(path, lambda stream: stream.write(token + "\n"), mode="w")
    path.chmod(0o600)
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server_version = "cxrlib-reader"
    sys_version = ""
    study: ReaderStudy
    token: str
    quiet: bool = False

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # the query string holds the token: log the path only
        if not self.quiet:
            sys.stderr.write(
                f"{self.address_string()} {self.command} {urlsplit(self.path).path} "
                f"{args[1] if len(args) > 1 else ''}\n"
            )

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; connect-src 'self'; "
            "img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'",
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ValueError(f"request body of {length} bytes (0 to {MAX_BODY_BYTES} accepted)")
        payload = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(payload, dict):
            raise ValueError("request body must be a JSON object")
        return payload

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        given = parse_qs(url.query).get("token", [""])[0]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self._json(
                HTTPStatus.FORBIDDEN,
                {"error": "missing or wrong study token: open the link you were given"},
            )
            return
        try:
            if method == "GET" and url.path == "/":
                self._send(HTTPStatus.OK, _page(self.token).encode(), "text/html; charset=utf-8")
            elif method == "GET" and url.path == "/app.js":
                self._send(HTTPStatus.OK, _APP_JS.encode(), "text/javascript; charset=utf-8")
            elif method == "GET" and url.path.startswith("/image/"):
                path = self.study.image_path(url.path[len("/image/") :])
                if path is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no such image"})
                else:
                    self._send(HTTPStatus.OK, path.read_bytes(), "image/png")
            elif method == "POST" and url.path == "/api/start":
                key, state = self.study.start(self._body().get("reader", ""))
                self._json(HTTPStatus.OK, {"reader": state["reader"], "key": key, "state": state})
            elif method == "POST" and url.path == "/api/state":
                body = self._body()
                self._json(HTTPStatus.OK, self.study.state(body.get("reader"), body.get("key")))
            elif method == "POST" and url.path == "/api/answer":
                body = self._body()
                try:
                    state = self.study.answer(
                        body.get("reader"),
                        body.get("key"),
                        body.get("trial"),
                        body.get("answer"),
                        confidence=body.get("confidence"),
                        class_answer=body.get("class_answer"),
                        seconds=body.get("seconds"),
                    )
                except StaleAnswer as exc:
                    self._json(
                        HTTPStatus.CONFLICT,
                        {
                            "error": str(exc),
                            "state": self.study.state(body.get("reader"), body.get("key")),
                        },
                    )
                    return
                self._json(HTTPStatus.OK, state)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except AccessDenied as exc:
            self._json(HTTPStatus.FORBIDDEN, {"error": str(exc)})
        except (ValueError, RuntimeError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})


def start_server(
    study: ReaderStudy | str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    expose: bool = False,
    quiet: bool = False,
) -> tuple[ThreadingHTTPServer, threading.Thread, str]:
    """Serve a study in a background thread: ``(server, thread, url)``; ``server.shutdown()`` stops it.

    ``host`` must be a loopback address unless ``expose`` (then e.g. ``0.0.0.0``: anyone who can
    reach the machine and has the link can read; put it behind TLS when it leaves a trusted
    network). ``port`` 0 picks a free port. ``token``: the link secret (default: the study's
    :func:`study_token`). ``url`` is the link to give readers.
    """
    if not expose and not _is_loopback(host):
        raise ValueError(
            f"host {host!r} is not a loopback address: pass expose=True (--expose) to serve "
            "the study on other interfaces"
        )
    study = study if isinstance(study, ReaderStudy) else ReaderStudy(study)
    token = token or study_token(study.folder)
    handler = type("StudyHandler", (_Handler,), {"study": study, "token": token, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="reader-study-server", daemon=True)
    thread.start()
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown_host}:{server.server_address[1]}/?token={token}"
    return server, thread, url


def _page(token: str) -> str:
    return _PAGE.replace("{{TOKEN}}", html.escape(token, quote=True))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Reader study: real or synthetic?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:1.5em auto;padding:0 1em;color:#222}
#image{width:512px;height:512px;max-width:100%;background:#000;display:block;margin:.5em 0}
button{font-size:1.15em;padding:.45em 1.4em;margin:.4em .6em .4em 0;border:0;border-radius:4px;cursor:pointer}
button:disabled{opacity:.5;cursor:default}
#real{background:#2e7d32;color:#fff}#synthetic{background:#c62828;color:#fff}
table{border-collapse:collapse;margin-top:.5em}td,th{border:1px solid #bbb;padding:.3em .8em}
td.num{text-align:right}.hidden{display:none}#message{color:#c62828}small{color:#555}
</style></head>
<body>
<h1>Real or synthetic?</h1>
<section id="login" class="hidden">
<p>Each chest X-ray is either real or made by a generator. Call each one; every answer is saved the moment
you click, and your scores are shown at the end. Keys: <b>r</b> real, <b>s</b> synthetic.</p>
<form id="login-form"><label>Your reader name (letters, digits, - and _):
<input id="reader" name="reader" required maxlength="40" pattern="[A-Za-z0-9_\\-]+" autocomplete="off"></label>
<button type="submit" id="start">start</button></form>
</section>
<section id="trial" class="hidden">
<p id="progress"></p>
<img id="image" alt="chest X-ray to judge">
<div><button id="real" type="button">real</button><button id="synthetic" type="button">synthetic</button></div>
<p><label>confidence <select id="confidence"><option value="">-</option><option>1</option><option>2</option>
<option selected>3</option><option>4</option><option>5</option></select></label> <small>1 guess .. 5 certain</small>
&nbsp; <label>class seen <select id="class-answer"><option value="">(no answer)</option><option>normal</option>
<option>pneumonia</option><option>covid</option></select></label></p>
<p><small>To continue later or on another device, keep <a id="resume-link" href="#">this page's address</a>:
it is your own.</small></p>
</section>
<section id="done" class="hidden"><p id="done-text"></p><table id="scores"></table>
<p><small>Sensitivity: synthetic images called synthetic; specificity: real images called real;
95% Wilson intervals.</small></p></section>
<p id="message" role="alert"></p>
<script src="/app.js?token={{TOKEN}}"></script>
</body></html>
"""

_APP_JS = r"""
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
let reader = null, key = null, state = null, shownAt = 0, busy = true, resumed = false;

function setBusy(value) { busy = value; $("real").disabled = $("synthetic").disabled = value; }
function fail(error) { $("message").textContent = error.message || String(error); }

async function api(path, body) {
  const response = await fetch(path + "?token=" + encodeURIComponent(token), {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), cache: "no-store"});
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) { const error = new Error(data.error || response.statusText); error.data = data; throw error; }
  return data;
}

function remember() {
  history.replaceState(null, "", location.pathname + location.search + "#reader=" + encodeURIComponent(reader)
                       + "&key=" + encodeURIComponent(key));
  $("resume-link").href = location.href;
}

function renderScores(rows) {
  const table = $("scores");
  table.replaceChildren();
  const head = table.insertRow();
  for (const title of ["measure", "value", "95% interval", "images"]) {
    const cell = document.createElement("th"); cell.textContent = title; head.appendChild(cell);
  }
  for (const row of rows) {
    const tr = table.insertRow();
    const fmt = (x) => (x === null || Number.isNaN(x) ? "-" : x.toFixed(2));
    const cells = [row.measure, fmt(row.value), fmt(row.low) + " - " + fmt(row.high), String(row.n)];
    cells.forEach((text, k) => { const td = tr.insertCell(); td.textContent = text; if (k) td.className = "num"; });
  }
}

function show(next) {
  state = next;
  $("message").textContent = "";
  $("login").classList.add("hidden");
  if (next.done) {
    $("trial").classList.add("hidden");
    $("done").classList.remove("hidden");
    $("done-text").textContent = "Done: " + next.answered + " answers saved. Your scores:";
    renderScores(next.scores);
    document.body.dataset.state = "done";
    return;
  }
  $("trial").classList.remove("hidden");
  $("progress").textContent = "image " + next.trial + " of " + next.n + (resumed ? " (resumed session)" : "");
  setBusy(true);
  document.body.dataset.state = "loading";
  const image = $("image");
  image.onload = () => { shownAt = performance.now(); setBusy(false); document.body.dataset.state = "trial-" + next.trial; };
  image.onerror = () => fail(new Error("the image could not be loaded; reload the page"));
  image.src = "/image/" + encodeURIComponent(next.image) + "?token=" + encodeURIComponent(token);
  $("class-answer").value = "";
}

async function answer(choice) {
  if (busy || !state || state.done) return;
  setBusy(true);
  const confidence = $("confidence").value;
  try {
    show(await api("/api/answer", {reader, key, trial: state.trial, answer: choice,
                                   confidence: confidence ? Number(confidence) : null,
                                   class_answer: $("class-answer").value || null,
                                   seconds: (performance.now() - shownAt) / 1000}));
  } catch (error) {
    if (error.data && error.data.state) show(error.data.state); else { fail(error); setBusy(false); }
  }
}

$("real").addEventListener("click", () => answer("real"));
$("synthetic").addEventListener("click", () => answer("synthetic"));
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT" || event.target.tagName === "SELECT") return;
  if (event.key === "r") answer("real"); else if (event.key === "s") answer("synthetic");
});
$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const data = await api("/api/start", {reader: $("reader").value.trim()});
    reader = data.reader; key = data.key; remember(); show(data.state);
  } catch (error) { fail(error); }
});

(async function init() {
  const saved = new URLSearchParams(location.hash.slice(1));
  if (saved.get("reader") && saved.get("key")) {
    reader = saved.get("reader"); key = saved.get("key");
    try {
      const next = await api("/api/state", {reader, key});
      resumed = next.answered > 0 && !next.done;
      remember(); show(next); return;
    } catch (error) { fail(error); }
  }
  $("login").classList.remove("hidden");
  document.body.dataset.state = "login";
})();
"""


def serve(
    study_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    expose: bool = False,
    new_token: bool = False,
) -> None:
    """Serve a study until Ctrl-C, printing the link to give readers (the command ``reader serve``)."""
    study = ReaderStudy(study_dir)
    token = study_token(study.folder, new=new_token)
    server, thread, url = start_server(study, host=host, port=port, token=token, expose=expose)
    print(
        f"serving study {study.settings.session!r} ({study.settings.n_images} images, "
        f"{len(study.readers)} reader(s) so far) "
        f"from {study.folder}\nreaders open: {url}\n(answers go to {study.answers_dir}; Ctrl-C stops)",
        flush=True,
    )
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
