"""docs/THREATS.md names real tests, every hostile test is named there, and the canary collector can find a leak.

Existence is checked here; that the named tests pass is what the rest of the suite is for.
"""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path

import pytest

from adversarial.conftest import CanaryCollector, _injection_stripped

ROOT = Path(__file__).resolve().parents[2]
THREATS = ROOT / "docs" / "THREATS.md"
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`")


def _named() -> list[tuple[str, str]]:
    return NODE.findall(THREATS.read_text())


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_named_in_threats_md_exists() -> None:
    named = _named()
    assert len(named) >= 50
    missing = [f"{file}::{name}" for file, name in named
               if not (ROOT / file).is_file() or name not in _test_functions(ROOT / file)]
    assert missing == []


def test_every_hostile_test_is_named_in_threats_md() -> None:
    named = {(file, name) for file, name in _named()}
    here = Path(__file__).parent
    unnamed = [f"{path.name}::{name}" for path in sorted(here.glob("test_*.py")) if path != Path(__file__)
               for name in sorted(_test_functions(path))
               if (f"tests/adversarial/{path.name}", name) not in named]
    assert unnamed == []


def test_the_collector_finds_a_planted_canary_raw_or_base64(tmp_path: Path) -> None:
    collector = CanaryCollector(tmp_path)
    canary = "cnry-planted-0123456789abcdef"
    collector.add_canary(canary, "planted")
    collector.add("clean", b"nothing to see " * 1000)
    collector.add("raw", b"prefix " + canary.encode() + b" suffix")
    collector.add("base64", b"x" + base64.b64encode(canary.encode()))
    collector.add("masked", b"*" * len(canary))
    assert collector.leaks() == ["planted found in raw", "planted (base64) found in base64"]
    with pytest.raises(AssertionError):
        collector.add_canary("not-prefixed", "bad")


def test_the_collector_allows_the_secret_only_where_it_is_injected() -> None:
    raw = (b"GET /x?a=1&hapikey=cnry-q&b=2 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer cnry-h\r\n"
           b"X-Echo: cnry-leak\r\n\r\nbody cnry-body")
    stripped = _injection_stripped(raw)
    assert b"cnry-q" not in stripped and b"cnry-h" not in stripped
    assert b"cnry-leak" in stripped and b"cnry-body" in stripped and b"a=1&b=2" in stripped
