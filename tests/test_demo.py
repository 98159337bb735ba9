import json

from contract import check_output_contract

from engine.io.demo_data import demo_members
from engine.output.dataset_reader import iter_samples


def test_demo_output_follows_the_contract(demo_output):
    inputs = sorted((demo_output / "input").glob("*.tar"))
    assert len(inputs) == 2
    results = check_output_contract(demo_output, inputs)
    for index, (_shard, (written, rejected)) in enumerate(sorted(results.items())):
        kinds = {m.key: m.meta["kind"] for m in demo_members(index)}
        assert {r["key"] for r in written} == {k for k, kind in kinds.items() if kind in ("scene", "poster", "slide")}
        assert {r["key"]: r["status"] for r in rejected if kinds[r["key"]] == "small"} == {
            k: "filtered" for k, kind in kinds.items() if kind == "small"}
        assert all(kinds[r["key"]] in ("small", "broken") for r in rejected)
        assert all(min(r["width"], r["height"]) >= 448 for r in written)
        assert all(r["url"].startswith("https://example.com/demo/") for r in written)
    metrics = json.loads((demo_output / "metrics.json").read_text())
    assert metrics["written"] == sum(len(w) for w, _ in results.values())
    assert {s["stage"] for s in metrics["stages"]} >= {"probe", "decode"}


def test_demo_ends_with_the_commands_that_read_its_output_and_they_work(demo_output, tiny_cache, tmp_path, capsys):
    """The demo's last lines are runnable commands: report (with the tiny-model banner and the
    Table 1 note), stats (with the note) and an export that holds the demo's captions."""
    import shlex
    import shutil

    import densefusion_local

    out = tmp_path / "demo out"  # a space: the printed commands must quote it
    shutil.copytree(demo_output, out)
    capsys.readouterr()
    # a rerun (nothing left to do, no model loaded) ends like the first run
    assert densefusion_local.main(["demo", "--out", str(out), "--no-progress", "--cache-dir", str(tiny_cache),
                                   "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.splitlines()
    steps = printed[printed.index("next, look at what the demo wrote:") + 1:]
    commands = [shlex.split(line, comments=True) for line in steps]
    assert [c[:3] for c in commands] == [["python", "densefusion_local.py", verb] for verb in ("report", "stats", "export")]
    said = {}
    for command in commands:
        assert densefusion_local.main(command[2:]) == 0, command
        said[command[2]] = capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "every caption, tag and box here is noise" in page
    assert 'id="tiny-banner"' in page and page.index('id="tiny-table1"') < page.index('id="table1-table"')
    assert "comparing these figures with the paper's rows means nothing" in said["stats"]
    records = json.loads((out / "export" / "densefusion_llava.json").read_text())
    assert len(records) == sum(bool(s.caption) for s in iter_samples(out)) > 0
