"""Security: nothing unpickled on the load path, remote code off by default, servers on 127.0.0.1 unless told."""

import re
from pathlib import Path

from realign.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("realign/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*")])

# What would unpickle: pickle itself and its wrappers, torch.load without weights_only=True, numpy's pickle switch.
UNPICKLING = [
    (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|cloudpickle)\b", re.M), "a pickle module"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"\.from_pickle\(|pd\.read_pickle|pandas\.read_pickle"), "a pickle reader"),
]


def test_no_source_file_unpickles():
    found = [f"{path.relative_to(ROOT)}: {what}" for path in SOURCES for pattern, what in UNPICKLING
             if pattern.search(path.read_text(errors="replace"))]
    assert not found, found


def test_the_patterns_catch_what_they_are_for():
    assert UNPICKLING[0][0].search("import pickle\n") and UNPICKLING[0][0].search("from joblib import load\n")
    assert UNPICKLING[1][0].search("torch.load(path)") and not UNPICKLING[1][0].search(
        "torch.load(path, weights_only=True)")


def test_remote_code_is_off_unless_a_config_turns_it_on():
    assert ModelConfig().trust_remote_code is False
    hits = [f"{path.relative_to(ROOT)}" for path in SOURCES
            if re.search(r"trust_remote_code\s*=\s*True", path.read_text(errors="replace"))]
    assert not hits, hits
    for preset in ROOT.glob("conf/model/*.yaml"):
        assert "trust_remote_code: true" not in preset.read_text().lower(), preset


def test_servers_in_docs_and_code_bind_to_loopback():
    texts = {p: p.read_text(errors="replace") for p in [ROOT / "README.md", ROOT / "MLproject", *SOURCES,
                                                        *ROOT.glob("docs/*.md"), *ROOT.glob("tests/*.py")]}
    hosts = [(p.name, m.group(1)) for p, text in texts.items()
             for m in re.finditer(r"--host[ =]+(\S+)", text)]
    assert hosts, "the README shows how to start the tracking server"
    assert all(host in ("127.0.0.1", "<address>") for _, host in hosts), hosts
    assert not [p.name for p, text in texts.items() if "0.0.0.0" in text and p.name != "test_security.py"]
