import json

from contract import check_output_contract

from engine.io.demo_data import demo_members


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
