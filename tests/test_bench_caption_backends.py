"""``python -m bench caption --backend ...`` compares backends on the same samples in one run."""

from bench import caption


def test_backends_are_compared_on_the_same_inputs(capsys, tmp_path):
    argv = ["--backend", "transformers", "openai", "--images", "2", "--batch", "2", "--tokens", "3",
            "--fake-latency", "0.01", "--concurrency", "2", "--cache-dir", str(tmp_path)]
    assert caption.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.strip().startswith(("transformers (", "openai ("))]
    assert [row.split()[0] for row in rows] == ["transformers", "openai", "openai"]
    assert rows[0].rstrip().endswith("1.00x")  # the first backend is the baseline
    assert "one batch at a time" in rows[1] and "two batches at a time" in rows[2]
    # two rows, each an untimed and a timed pass over the 2 images
    assert any("'api_requests': 8.0" in line for line in lines)
