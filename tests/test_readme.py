"""README's Library section runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Library") :]
    section = section[: section.index("\n## ", 3)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    run, result = namespace["run"], namespace["result"]
    assert not run.failed and len(run.frames) == 3
    assert (tmp_path / "out" / "results.csv").is_file()
    assert result.data.shape == (1, 480, 640)
    truth = 1 / namespace["field"].frames[1].scale(namespace["field"].reference)[0]
    assert abs(result.transmission[0] / truth - 1) < 0.02
    assert "frames/light_001.fits" in capsys.readouterr().out
