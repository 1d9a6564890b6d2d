"""The reader study web app: study folder from a run, token, reader keys, opaque images, resume, export."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlib import reader_study as rs
from cxrlib import reader_web as rw
from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image, write_png
from cxrlib.runs import write_json
from cxrlib.stages import get_stage

STAGE = get_stage("06").name


def make_tiny_run(
    run_dir: Path,
    *,
    n_real: int = 12,
    n_diffusion: int = 8,
    n_translated: int = 6,
    real_images: Path | None = None,
) -> Path:
    """A finished notebook 06 in miniature: manifest (real COVID-19 val/test images, normal training
    images, diffusion samples, G_NC translations), images and params.json; returns ``run_dir``.
    ``real_images``: a folder for the real images (default: inside the run)."""
    from cxrlib.data.phantom import CohortConfig, generate_cohort

    stage = run_dir / STAGE
    n_total = n_real + n_diffusion + 2 * n_translated
    cohort = CohortConfig(n_patients=n_total, size=64, images_per_patient=(1, 1), text=False)
    pictures = (sample.image for sample in generate_cohort(cohort))
    rows = []

    def add(image_id: str, label: str, split: str, origin: str) -> None:
        folder = real_images if real_images is not None and origin == "real" else stage / "images"
        path = write_png(folder / f"{image_id}.png", next(pictures))
        rows.append(
            {
                "image_id": image_id,
                "path": str(path),
                "label": label,
                "patient_id": image_id.split("_")[0] if origin == "real" else image_id,
                "source": "siteA" if origin == "real" else "synthetic",
                "view": "PA",
                "split": split,
                "mask_path": "",
                "origin": origin,
            }
        )

    for k in range(n_real):
        add(f"p{k:02d}_covid", "covid", "val" if k % 2 else "test", "real")
    for k in range(n_translated):
        add(f"n{k:02d}_normal", "normal", "train", "real")
    for k in range(n_diffusion):
        add(
            f"diffusion_covid_{k:04d}",
            "covid",
            "train",
            mf.make_origin("diffusion", "ckpt.pt"),
        )
    for k in range(n_translated):
        add(
            f"G_NC_{k:02d}",
            "covid",
            "train",
            mf.make_origin("G_NC", "g.pt", f"n{k:02d}_normal"),
        )
    mf.write_manifest(pd.DataFrame(rows), stage / "manifest.csv")
    write_json(
        stage / "params.json",
        {"params": {"IMAGE_SIZE": 64, "READER_IMAGES": 10, "SEED": 0, "READER_SESSION": "demo"}},
    )
    return run_dir


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reader_web")
    return rw.prepare_from_run(make_tiny_run(root / "run"), root / "study")


def test_prepare_builds_a_self_contained_study_with_the_notebooks_sequence(study_dir, tmp_path):
    settings = rw.StudySettings.read(study_dir)
    assert (settings.session, settings.n_images, settings.seed) == ("demo", 10, 0)
    assert settings.image_size == 64
    assert settings.generators == ("diffusion", "G_NC")
    pool = pd.read_csv(study_dir / rw.POOL_FILE, dtype=str)
    assert len(pool) == 12 + 8 + 6 and pool["image"].is_unique
    files = sorted(p.name for p in (study_dir / rw.IMAGES_DIR).iterdir())
    # opaque names: nothing of the image id, label or generator reaches a file name
    assert len(files) == len(pool) and all(
        re.fullmatch(r"[0-9a-f]{16}\.png", name) for name in files
    )
    shown = read_image(study_dir / rw.IMAGES_DIR / files[0])
    assert shown.shape == (256, 256) and shown.dtype == np.uint8

    # the same images, in the same draw, as notebook 06's scripted reader (same pools, seed, length)
    manifest = mf.read_manifest(study_dir.parent / "run" / STAGE / "manifest.csv")
    real, pools = rw.run_pools(manifest)
    expected = rs.make_sequence(real, pools, n_images=10, seed=0)
    study = rw.ReaderStudy(study_dir)
    assert study.sequence["image_id"].tolist() == expected["image_id"].tolist()

    with pytest.raises(FileExistsError, match="prepared once"):
        rw.prepare_from_run(study_dir.parent / "run", study_dir)
    with pytest.raises(FileNotFoundError, match="no finished notebook 06"):
        rw.prepare_from_run(tmp_path, tmp_path / "other")


def test_reader_prepare_command_writes_a_study_folder(tmp_path, capsys):
    from cxrlib.__main__ import main

    run = make_tiny_run(tmp_path / "run")
    assert (
        main(
            [
                "reader",
                "prepare",
                "--run",
                str(run),
                "--out",
                str(tmp_path / "s"),
                "--images",
                "6",
                "--session",
                "pilot",
            ]
        )
        == 0
    )
    settings = rw.StudySettings.read(tmp_path / "s")
    assert (settings.session, settings.n_images) == ("pilot", 6)
    assert "reader serve --study" in capsys.readouterr().out
    assert main(["reader", "prepare", "--run", str(run), "--out", str(tmp_path / "s")]) == 1


class Client:
    """Requests to a running study server; returns ``(status, decoded body)``."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def request(self, path: str, body: dict | bytes | None = None, *, token: str | None = None):
        token = self.token if token is None else token
        url = f"{self.base}{path}" + (f"?token={token}" if token else "")
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url, data=data, method="POST" if data is not None else "GET"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, payload, kind = (
                    response.status,
                    response.read(),
                    response.headers["Content-Type"],
                )
        except urllib.error.HTTPError as error:
            status, payload, kind = error.code, error.read(), error.headers["Content-Type"]
        return status, (json.loads(payload) if kind.startswith("application/json") else payload)


@pytest.fixture()
def served(study_dir, tmp_path):
    import shutil

    folder = shutil.copytree(study_dir, tmp_path / "study")
    servers = []

    def start():
        server, _, url = rw.start_server(folder, port=0, quiet=True)
        servers.append(server)
        base, token = url.split("/?token=")
        return Client(base, token)

    yield folder, start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_every_request_needs_the_study_token(served):
    folder, start = served
    client = start()
    assert client.request("/")[0] == 200
    for path, body in [
        ("/", None),
        ("/app.js", None),
        ("/api/start", {"reader": "ann"}),
        ("/image/00", None),
    ]:
        assert client.request(path, body, token="")[0] == 403
        assert client.request(path, body, token="wrong" + client.token)[0] == 403
    assert not (folder / rw.ANSWERS_DIR / "ann__demo.csv").exists()
    # the token outlives a restart (links keep working); a new one can be asked for
    assert rw.study_token(folder) == client.token != rw.study_token(folder, new=True)


def test_images_are_served_by_opaque_id_only(served):
    folder, start = served
    client = start()
    status, started = client.request("/api/start", {"reader": "ann"})
    assert status == 200
    opaque = started["state"]["image"]
    status, png = client.request(f"/image/{opaque}")
    assert status == 200 and png == (folder / rw.IMAGES_DIR / f"{opaque}.png").read_bytes()
    in_sequence = set(rw.ReaderStudy(folder).sequence["image_id"])
    pool = pd.read_csv(folder / rw.POOL_FILE, dtype=str)
    outside = pool.loc[~pool["image_id"].isin(in_sequence), "image"].iloc[0]
    for path in [
        f"/image/{opaque}.png",
        f"/image/images/{opaque}.png",
        f"/images/{opaque}.png",
        "/image/../study.json",
        "/image/%2e%2e%2fstudy.json",
        "/image//etc/passwd",
        "/image/" + "0" * 16,
        f"/image/{outside}",
        "/study.json",
        "/answers/readers.json",
        "/image/p00_covid",
        "/pool.csv",
    ]:
        assert client.request(path)[0] == 404, path


def test_a_reader_opens_only_their_own_session(served):
    folder, start = served
    client = start()
    ann = client.request("/api/start", {"reader": "ann"})[1]
    bob = client.request("/api/start", {"reader": "bob"})[1]
    assert ann["key"] != bob["key"]
    refused = [
        client.request("/api/start", {"reader": "ann"}),  # the name is taken
        client.request("/api/state", {"reader": "ann"}),  # no key
        client.request("/api/state", {"reader": "ann", "key": bob["key"]}),
        client.request("/api/state", {"reader": "carl", "key": ann["key"]}),
        client.request(
            "/api/answer", {"reader": "ann", "key": bob["key"], "trial": 1, "answer": "real"}
        ),
    ]
    assert [status for status, _ in refused] == [403] * len(refused)
    assert rs.read_answers(folder / rw.ANSWERS_DIR / "ann__demo.csv").empty
    # a key is stored only as its hash
    assert ann["key"] not in (folder / rw.ANSWERS_DIR / rw.READERS_FILE).read_text()
    for bad in (
        {"reader": "../ann"},
        {"reader": "x" * 41},
        b"not json",
        b"[1]",
        b"{" + b" " * 5000 + b"}",
    ):
        assert client.request("/api/start", bad)[0] == 400
    import http.client

    host, port = client.base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", f"/api/start?token={client.token}")
    connection.putheader("Content-Length", "-1")  # would block a naive read until the socket closes
    connection.endheaders()
    assert connection.getresponse().status == 400
    connection.close()
    # same images for every reader, each in an order of their own
    study = rw.ReaderStudy(folder)
    ann_order, bob_order = (
        study.reader_sequence("ann")["image_id"],
        study.reader_sequence("bob")["image_id"],
    )
    assert sorted(ann_order) == sorted(bob_order) and list(ann_order) != list(bob_order)


def test_a_session_is_saved_click_by_click_resumes_after_a_restart_and_scores_only_at_the_end(
    served,
):
    folder, start = served
    client = start()
    key = client.request("/api/start", {"reader": "ann"})[1]["key"]
    me = {"reader": "ann", "key": key}
    truth = rw.ReaderStudy(folder).reader_sequence("ann").set_index("trial")["truth"]
    path = folder / rw.ANSWERS_DIR / "ann__demo.csv"

    def answer_all(until: int) -> dict:
        state = client.request("/api/state", me)[1]
        while state["answered"] < until:
            # blinded: nothing but the trial number and an opaque image id
            assert set(state) == {"reader", "n", "answered", "done", "trial", "image"}
            trial = state["trial"]
            status, state = client.request(
                "/api/answer",
                {**me, "trial": trial, "answer": truth[trial], "confidence": 4, "seconds": 1.5},
            )
            assert status == 200
            assert len(rs.read_answers(path)) == trial  # on disk before the next image
        return state

    state = answer_all(4)
    status, stale = client.request(
        "/api/answer", {**me, "trial": 4, "answer": "real"}
    )  # a double click
    assert status == 409 and stale["state"]["trial"] == 5 and len(rs.read_answers(path)) == 4

    client = start()  # a restarted server: same token, same key, continues at trial 5
    assert client.request("/api/state", me)[1]["trial"] == 5
    state = answer_all(10)
    assert state["done"] and state["answered"] == 10
    scores = {row["measure"]: row for row in state["scores"]}
    assert scores["accuracy"]["value"] == 1.0 and scores["accuracy"]["n"] == 10
    assert {"sensitivity (diffusion)", "sensitivity (G_NC)", "specificity (real)"} <= set(scores)
    answers = rs.read_answers(path)
    assert answers["trial"].tolist() == list(range(1, 11)) and set(answers["confidence"]) == {"4"}
    assert client.request("/api/answer", {**me, "trial": 10, "answer": "real"})[0] == 409


def test_export_gives_notebook_06_the_answers_of_every_reader(served, tmp_path):
    folder, _ = served
    study = rw.ReaderStudy(folder)
    for reader, flip in (("ann", False), ("bob", True)):
        key, state = study.start(reader)
        while not state["done"]:
            truth = study.reader_sequence(reader).set_index("trial")["truth"][state["trial"]]
            call = (
                ("real" if truth == "synthetic" else "synthetic")
                if flip and state["trial"] % 2
                else truth
            )
            state = study.answer(reader, key, state["trial"], call)
    reader_dir = tmp_path / "run" / STAGE / "reader_study"
    copied = rw.export_answers(folder, reader_dir)
    assert sorted(p.name for p in copied) == ["ann__demo.csv", "bob__demo.csv"]
    answers, problems = rs.collect_answers(reader_dir, "demo")
    assert not problems and len(answers) == 20
    table = rs.score_table(answers).set_index("reader")
    assert table.loc["ann", "accuracy"] == 1.0 and table.loc["bob", "accuracy"] == 0.5
    kappa = rs.agreement(answers)
    assert kappa["n_common"].tolist() == [10]  # one sequence, two orders: every image compared
    (folder / rw.ANSWERS_DIR / "ann__demo.csv").write_text("changed\n")
    with pytest.raises(FileExistsError, match="other content"):
        rw.export_answers(folder, reader_dir)


def test_serving_beyond_loopback_needs_the_explicit_flag(study_dir, capsys):
    from cxrlib.__main__ import main

    with pytest.raises(ValueError, match="expose"):
        rw.start_server(study_dir, host="0.0.0.0", port=0)
    assert (
        main(["reader", "serve", "--study", str(study_dir), "--host", "0.0.0.0", "--port", "0"])
        == 1
    )
    assert "--expose" in capsys.readouterr().err
    server, _, url = rw.start_server(study_dir, host="0.0.0.0", port=0, expose=True, quiet=True)
    try:
        assert server.server_address[0] == "0.0.0.0" and "token=" in url
    finally:
        server.shutdown()
        server.server_close()


def test_a_lost_link_is_replaced_and_the_old_key_stops_working(served, capsys):
    from urllib.parse import unquote

    from cxrlib.__main__ import main

    folder, start = served
    client = start()
    old = client.request("/api/start", {"reader": "ann"})[1]["key"]
    assert main(["reader", "link", "--study", str(folder), "--reader", "ann"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith(f"http://127.0.0.1:8866/?token={client.token}#reader=ann&key=")
    new = unquote(link.rsplit("&key=", 1)[1])
    # the running server takes the new key and refuses the old one
    assert client.request("/api/state", {"reader": "ann", "key": new})[0] == 200
    assert client.request("/api/state", {"reader": "ann", "key": old})[0] == 403
    assert main(["reader", "link", "--study", str(folder), "--reader", "nobody"]) == 1


def test_prepare_refuses_bad_pools_and_leaves_no_half_study(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    real, pools = rw.run_pools(mf.read_manifest(run / STAGE / "manifest.csv"))
    settings = dict(n_images=10, seed=0, session="s", image_size=64)
    with pytest.raises(ValueError, match="repeat across pools"):
        rw.prepare_study(tmp_path / "a", real, {**pools, "copies": real.iloc[:3]}, **settings)
    assert not (tmp_path / "a").exists()
    broken = pools["G_NC"].assign(path=str(tmp_path / "missing.png"))
    with pytest.raises(Exception, match="missing.png"):
        rw.prepare_study(tmp_path / "b", real, {**pools, "G_NC": broken}, **settings)
    assert (
        not (tmp_path / "b" / rw.IMAGES_DIR).exists()
        and not (tmp_path / "b" / rw.STUDY_FILE).exists()
    )
    with pytest.raises(ValueError, match="cannot fill"):
        rw.prepare_study(tmp_path / "c", real.iloc[:0], pools, **settings)


def test_prepare_reads_images_of_a_data_folder_outside_the_run_only_when_allowed(tmp_path, capsys):
    from cxrlib.__main__ import main

    run = make_tiny_run(tmp_path / "run", real_images=tmp_path / "dataset")
    assert main(["reader", "prepare", "--run", str(run), "--out", str(tmp_path / "s")]) == 1
    assert "--allow-root" in capsys.readouterr().err and not (tmp_path / "s").exists()
    arguments = ["--allow-root", str(tmp_path / "dataset")]
    assert (
        main(["reader", "prepare", "--run", str(run), "--out", str(tmp_path / "s"), *arguments])
        == 0
    )
    assert rw.ReaderStudy(tmp_path / "s").settings.n_images == 10
