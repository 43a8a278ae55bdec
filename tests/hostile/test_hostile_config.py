"""Hostile configs cost milliseconds: every one exits 2 with one line naming the limit, never a
traceback or a hang.

A "billion laughs" config (ten nested aliases of ten: 10^10 values out of 1 KB), a config file
above the size limit, a ``--set`` value above its limit, nesting past the depth limit (by
brackets, by a chain of aliases, by a dotted ``--set`` key), an alias inside its own anchor and a
file that is not UTF-8. Each runs ``omni_ray.launch.cli.main`` in this process (the code path of
the ``omni-ray`` script) under a pytest timeout, so a regression is a failed test, not a hung suite.
"""

from __future__ import annotations

import pytest

from omni_ray import config as config_module
from omni_ray.launch.cli import main

BASE = "data: {train: /d.jsonl}\n"


def billion_laughs(levels: int = 10) -> str:
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    # Under an extra key, under model.processor: a free-form dict, so nothing refuses it by schema.
    return "model: {path: /m, processor: {extra: {" + ", ".join(lines) + "}}}\n" + BASE


def alias_chain(length: int) -> str:
    """Each anchor holds the previous one: few lines, but nested `length` levels deep once expanded."""
    lines = ["a0: &a0 x"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, length + 1)]
    return "model: {path: /m, processor: {" + ", ".join(lines) + "}}\n" + BASE


CASES = {
    "billion laughs": (billion_laughs(), [], ["aliases expand to more than", f"{config_module.MAX_YAML_VALUES:,}"]),
    "deep brackets": ("model: {path: /m, processor: {x: " + "[" * 5000 + "]" * 5000 + "}}\n" + BASE, [],
                      [f"more than {config_module.MAX_YAML_DEPTH} levels"]),
    "deep alias chain": (alias_chain(200), [], [f"more than {config_module.MAX_YAML_DEPTH} levels"]),
    "alias inside its anchor": ("model: {path: /m, processor: {x: &a [1, *a]}}\n" + BASE, [],
                                ["refers to the anchor it is inside"]),
    "file too large": ("model: {path: /m}\n" + BASE + "# " + "x" * (config_module.MAX_CONFIG_BYTES + 10) + "\n", [],
                       ["bytes, above the limit", f"{config_module.MAX_CONFIG_BYTES:,}"]),
    "--set too large": ("model: {path: /m}\n" + BASE, ["model.path=" + "x" * (config_module.MAX_SET_BYTES + 1)],
                        ["--set", "above the limit", f"{config_module.MAX_SET_BYTES:,}"]),
    "--set billion laughs": ("model: {path: /m}\n" + BASE,
                             ["model.processor=" + billion_laughs().split("processor: ", 1)[1].split("}}\n")[0] + "}"],
                             ["--set model.processor", "aliases expand"]),
    "--set deep key": ("model: {path: /m}\n" + BASE, ["model.processor." + ".".join(["k"] * 5000) + "=1"],
                       ["--set", "levels deep"]),
    "--set bad YAML": ("model: {path: /m}\n" + BASE, ["train.lr=[1, 2"], ["--set train.lr", "not valid YAML"]),
    "not UTF-8": (b"model: {path: /m}\n# \xff\xfe\n".decode("latin-1") + BASE, [], ["not UTF-8"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_config_is_one_line_exit_2(case, tmp_path, capsys):
    text, sets, words = CASES[case]
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("latin-1") if case == "not UTF-8" else text.encode())
    code = main(["validate", str(path), *[arg for s in sets for arg in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and len(err) < 600
    for word in words:
        assert word in err, (word, err)


def test_limits_leave_real_configs_alone(tmp_path):
    """The shipped job configs and an ordinary use of anchors load unchanged under the limits."""
    from pathlib import Path

    shared = "model: {path: /m, processor: &p {scale_resolution: 448}}\n" + BASE + "eval: {}\n"
    path = tmp_path / "anchors.yaml"
    path.write_text(shared.replace("eval: {}\n", ""))
    assert config_module.load_config(path).model.processor == {"scale_resolution": 448}
    jobs = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        config_module.load_config(job)
