"""Reader study: balanced seeded sequences, crash-safe resumable answer files, scores and agreement."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib import reader_study as rs


def _pools(n_real: int = 30, n_each: int = 12) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    def rows(prefix: str, n: int) -> pd.DataFrame:
        return pd.DataFrame({"image_id": [f"{prefix}{i}" for i in range(n)],
                             "path": [f"/img/{prefix}{i}.png" for i in range(n)], "label": "covid"})

    return rows("r", n_real), {"G_NC": rows("a", n_each), "G_PC": rows("b", n_each), "diffusion": rows("d", n_each)}


def test_sequence_is_balanced_seeded_and_shuffled():
    real, synthetic = _pools()
    sequence = rs.make_sequence(real, synthetic, n_images=40, seed=1)
    assert list(sequence.columns) == list(rs.SEQUENCE_COLUMNS)
    assert sequence["trial"].tolist() == list(range(1, 41))
    assert (sequence["truth"] == "real").sum() == 20
    assert sequence["generator"].value_counts().to_dict() == {"real": 20, "G_NC": 7, "G_PC": 7, "diffusion": 6}
    assert sequence["image_id"].is_unique
    assert sequence.equals(rs.make_sequence(real, synthetic, n_images=40, seed=1))
    assert not sequence["image_id"].equals(rs.make_sequence(real, synthetic, n_images=40, seed=2)["image_id"])
    assert not sequence["truth"].iloc[:20].eq("real").all()  # shuffled, not blocked
    with pytest.raises(ValueError, match="G_NC: 12 image"):
        rs.make_sequence(_pools(n_real=60)[0], synthetic, n_images=80)
    with pytest.raises(ValueError, match="even"):
        rs.make_sequence(real, synthetic, n_images=7)


def test_fitting_length_is_the_longest_sequence_the_pools_allow(tmp_path):
    real, synthetic = _pools(n_real=30, n_each=12)
    assert rs.fitting_length(40, real, synthetic) == 40
    assert rs.fitting_length(41, real, synthetic) == 40
    assert rs.fitting_length(100, real, synthetic) == 60  # 30 real images
    small = {**synthetic, "G_PC": synthetic["G_PC"].iloc[:3]}
    # 10 synthetic: G_NC 4, G_PC 3, diffusion 3 (the first generators take the extras); 11 would need 4 of G_PC
    assert rs.fitting_length(100, real, small) == 20
    n = rs.fitting_length(100, real, small)
    assert len(rs.make_sequence(real, small, n_images=n)) == n
    with pytest.raises(ValueError):
        rs.make_sequence(real, small, n_images=n + 2)
    assert rs.fitting_length(40, real, {}) == 0 and rs.fitting_length(40, real.iloc[:0], synthetic) == 0


def test_outside_sequence_keeps_only_images_the_reader_is_not_shown():
    real, synthetic = _pools(n_real=6, n_each=4)
    sequence = rs.make_sequence(real, synthetic, n_images=6, seed=0)
    sets = [(rows, np.full((len(rows), 2, 2), k, np.uint8)) for k, rows in enumerate(synthetic.values())]
    held_back = rs.outside_sequence(sequence, sets)
    assert len(held_back) == 3 * 4 - 3  # one image of each generator is in the sequence
    counts = np.bincount(held_back[:, 0, 0], minlength=3)
    assert counts.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="3 rows for 4 images"):
        rs.outside_sequence(sequence, [(synthetic["G_NC"].iloc[:3], sets[0][1])])


def test_image_pool_makes_paths_absolute_against_a_folder(tmp_path):
    rows = pd.DataFrame({"image_id": ["a", "b"], "path": ["img/a.png", str(tmp_path / "elsewhere" / "b.png")],
                         "label": "covid"})
    pooled = rs.image_pool(rows, tmp_path / "data")
    assert pooled["path"].tolist() == [str(tmp_path / "data" / "img" / "a.png"), str(tmp_path / "elsewhere" / "b.png")]
    assert pooled["label"].tolist() == ["covid", "covid"] and rows["path"].iloc[0] == "img/a.png"
    # manifest paths are absolute already; a manifest frame as second argument is accepted and ignored
    absolute = pooled.drop(columns="label")
    assert rs.image_pool(absolute, absolute)["path"].tolist() == pooled["path"].tolist()
    with pytest.raises(ValueError, match="absolute in memory"):
        rs.image_pool(rows)


def test_answers_are_on_disk_after_every_click_and_sessions_resume(tmp_path):
    real, synthetic = _pools()
    sequence = rs.make_sequence(real, synthetic, n_images=6, seed=0)
    session = rs.ReaderSession(tmp_path, "ann", "s1", sequence)
    assert not session.resumed and session.current()["trial"] == 1
    session.answer("real", confidence=4, class_answer="covid", seconds=1.5)
    session.answer("synthetic")
    on_disk = rs.read_answers(session.path)
    assert on_disk["trial"].tolist() == [1, 2]
    assert on_disk.loc[0, "confidence"] == "4" and on_disk.loc[0, "class_answer"] == "covid"
    assert list(pd.read_csv(session.path).columns) == list(rs.ANSWER_COLUMNS)

    # the kernel dies: a new session object on the same files continues at trial 3
    resumed = rs.ReaderSession(tmp_path, "ann", "s1")
    assert resumed.resumed and resumed.n_answered == 2 and resumed.current()["trial"] == 3
    assert resumed.sequence["image_id"].tolist() == sequence["image_id"].tolist()
    with pytest.raises(ValueError, match="another sequence"):
        rs.ReaderSession(tmp_path, "ann", "s1", rs.make_sequence(real, synthetic, n_images=6, seed=9))
    for _ in range(4):
        resumed.answer("real")
    assert resumed.done
    with pytest.raises(RuntimeError, match="complete"):
        resumed.answer("real")
    with pytest.raises(ValueError, match="answer must be"):
        rs.ReaderSession(tmp_path, "bob", "s1").answer("maybe")


def test_a_line_cut_off_by_a_crash_is_dropped_and_bad_files_are_named(tmp_path):
    real, synthetic = _pools()
    session = rs.ReaderSession(tmp_path, "ann", "s1", rs.make_sequence(real, synthetic, n_images=4))
    session.answer("real")
    with session.path.open("a") as stream:
        stream.write("ann,s1,2,r3,real")  # half a line
    assert len(rs.read_answers(session.path)) == 1
    broken = tmp_path / "x__s1.csv"
    broken.write_text("something,else\n")
    with pytest.raises(ValueError, match="not a reader-study answer file"):
        rs.read_answers(broken)
    answers, problems = rs.collect_answers(tmp_path)
    assert len(answers) == 1 and len(problems) == 1 and "x__s1.csv" in problems[0]
    with pytest.raises(ValueError, match="reader name"):
        rs.ReaderSession(tmp_path, "ann smith", "s1")


def test_scores_with_wilson_intervals_per_generator():
    answers = pd.DataFrame({
        "reader": "ann", "session": "s", "trial": range(1, 9),
        "image_id": [f"i{i}" for i in range(8)],
        "generator": ["real"] * 4 + ["G_NC"] * 2 + ["diffusion"] * 2,
        "truth": ["real"] * 4 + ["synthetic"] * 4,
        "answer": ["real", "real", "real", "synthetic", "synthetic", "synthetic", "real", "synthetic"],
    })
    scores = rs.score_answers(answers)
    assert scores["accuracy"] == pytest.approx(6 / 8)
    assert scores["sensitivity"] == pytest.approx(3 / 4) and scores["specificity"] == pytest.approx(3 / 4)
    low, high = scores["accuracy_ci95"]
    assert low < 0.75 < high and 0 <= low and high <= 1
    assert scores["per_generator"]["G_NC"]["rate"] == 1.0 and scores["per_generator"]["diffusion"]["rate"] == 0.5
    assert scores["per_generator"]["real"]["measure"] == "specificity"
    table = rs.score_table(answers)
    assert table.loc[0, "sensitivity_G_NC"] == 1.0 and table.loc[0, "specificity_real"] == 0.75


def test_kappa_between_readers():
    base = {"session": "s", "trial": range(1, 7), "image_id": [f"i{i}" for i in range(6)],
            "generator": "real", "truth": "real"}
    ann = pd.DataFrame({**base, "reader": "ann", "answer": ["real", "synthetic"] * 3})
    bob = pd.DataFrame({**base, "reader": "bob", "answer": ["real", "synthetic"] * 3})
    eve = pd.DataFrame({**base, "reader": "eve", "answer": ["synthetic", "real"] * 3})
    kappas = rs.agreement(pd.concat([ann, bob, eve]))
    by_pair = {(r.reader_a, r.reader_b): r.kappa for r in kappas.itertuples()}
    assert by_pair[("ann", "bob")] == pytest.approx(1.0)
    assert by_pair[("ann", "eve")] == pytest.approx(-1.0)
    assert rs.agreement(ann).empty


def test_scripted_reader_answers_every_trial_from_probabilities(tmp_path):
    real, synthetic = _pools()
    sequence = rs.make_sequence(real, synthetic, n_images=10, seed=0)
    session = rs.ReaderSession(tmp_path, "probe", "s", sequence)
    session.answer("real")  # resumes after a person's first answer

    def oracle(trials):  # a perfect detector
        return np.array([1.0 if t["truth"] == "synthetic" else 0.0 for t in trials])

    answers = rs.scripted_reader(session, oracle)
    assert session.done and len(answers) == 10
    assert (answers["answer"].iloc[1:] == answers["truth"].iloc[1:]).all()
    assert set(answers["confidence"].iloc[1:]) == {5}
    features_real = np.random.default_rng(0).normal(0, 1, (20, 3))
    features_synthetic = np.random.default_rng(1).normal(3, 1, (20, 3))
    probe = rs.fit_detector(features_real, features_synthetic)
    assert probe.predict_proba(np.array([[3.0, 3.0, 3.0]]))[0, 1] > 0.9


def _widgets(root, kind):
    """Every widget of type ``kind`` inside ``root`` (depth first)."""
    found = [root] if isinstance(root, kind) else []
    for child in getattr(root, "children", ()):
        found += _widgets(child, kind)
    return found


def test_reader_app_records_a_40_image_session_click_by_click_and_shows_the_scores(tmp_path):
    import ipywidgets as widgets

    from cxrlib.viz.diffusion import reader_app

    real, synthetic = _pools()
    sequence = rs.make_sequence(real, synthetic, n_images=40, seed=3)
    truth = dict(zip(sequence["image_id"], sequence["truth"], strict=True))
    shown = []

    def load_image(trial):
        shown.append(trial["image_id"])
        return np.full((32, 32), 100 if trial["truth"] == "real" else 200, np.uint8)

    app = reader_app(rs.ReaderSession(tmp_path, "ann", "class1", sequence), load_image)
    buttons = {b.description: b for b in _widgets(app, widgets.Button)}
    picture = _widgets(app, widgets.Image)[0]
    assert set(buttons) == {"real", "synthetic"} and bytes(picture.value).startswith(b"\x89PNG")
    path = tmp_path / "ann__class1.csv"

    # a reader who is right on the first 25 images, then the kernel dies
    for k in range(25):
        buttons[truth[shown[-1]]].click()
        assert len(rs.read_answers(path)) == k + 1  # on disk before the next image appears
    assert shown[:25] == sequence["image_id"].iloc[:25].tolist()

    # a new app on the same files resumes at image 26; this reader calls everything synthetic from here
    shown.clear()
    app = reader_app(rs.ReaderSession(tmp_path, "ann", "class1"), load_image)
    buttons = {b.description: b for b in _widgets(app, widgets.Button)}
    status = _widgets(app, widgets.Label)[0]
    assert "image 26 of 40" in status.value and "resumed" in status.value
    for _ in range(15):
        buttons["synthetic"].click()
    assert buttons["real"].disabled and buttons["synthetic"].disabled and status.value.startswith("done: 40 answers")
    progress = _widgets(app, widgets.IntProgress)[0]
    assert progress.value == progress.max == 40

    answers = rs.read_answers(path)
    assert answers["trial"].astype(int).tolist() == list(range(1, 41))
    expected = rs.score_answers(answers)
    later_real = (sequence["truth"].iloc[25:] == "real").sum()
    assert expected["accuracy"] == pytest.approx((40 - later_real) / 40)
    # the scores the reader sees are the score table of their own answers
    table = _widgets(app, widgets.HTML)[-1].value
    assert f"<td>{expected['accuracy']:.2f}</td>" in table and f"<td>{expected['specificity']:.2f}</td>" in table
    assert "sensitivity_low" in table
