"""Shell completions: the committed scripts are current, and bash, zsh and fish complete through them.

Names (workspaces, credentials, runs) come from `outloop __complete` at TAB time, so a profile created after the
scripts were generated completes too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import OUTLOOP, World
from sandbox_support import require_program

REPO = Path(__file__).resolve().parents[1]
COMPLETIONS = REPO / "completions"


def shell_env(world: World) -> dict[str, str]:
    """PATH starting with the venv, so the scripts' `outloop __complete` is the installed binary."""
    return {**world.env, "PATH": f"{Path(OUTLOOP).parent}:/usr/bin:/bin"}


def bash_complete(world: World, *words: str) -> list[str]:
    script = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _outloop; '
              'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", script, "_", str(COMPLETIONS / "outloop.bash"), "outloop", *words],
                         env=shell_env(world), capture_output=True, text=True, timeout=30, cwd=world.work)
    return [line for line in out.stdout.splitlines() if line]


def test_committed_scripts_match_the_commands(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "outloop_cli.completion_gen", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("outloop.bash", "_outloop", "outloop.fish"):
        fresh, committed = (tmp_path / name).read_text(), (COMPLETIONS / name).read_text()
        assert fresh == committed, f"completions/{name} is stale: run `make completions` and commit it"


def test_bash_completes_commands_options_and_fixed_choices(world: World) -> None:
    assert bash_complete(world, "") == ["audit", "doctor", "policy", "run", "secret", "workspace"]
    assert bash_complete(world, "audit", "") == ["central", "events", "export", "prune", "ship", "show", "tail",
                                                 "verify"]
    assert bash_complete(world, "audit", "events", "--d") == ["--decision"]
    assert bash_complete(world, "audit", "events", "--decision", "") == ["allow", "deny"]
    assert bash_complete(world, "audit", "events", "--decision", "=", "d") == ["deny"]
    assert bash_complete(world, "audit", "export", "--format", "") == ["jsonl", "csv"]
    assert bash_complete(world, "run", "--network", "b") == ["broker-only"]
    assert "__complete" not in bash_complete(world, "_")


def test_bash_completes_workspaces_and_credentials_created_after_generation(world: World) -> None:
    world.write_profile("initech", 'version = 1\n[credentials.mail]\nsecret = "keyring"\nbase_url = "{UPSTREAM}"\n')
    assert bash_complete(world, "workspace", "show", "") == ["acme", "agency", "globex", "initech"]
    assert bash_complete(world, "secret", "set", "initech", "") == ["mail"]
    assert bash_complete(world, "secret", "set", "acme", "") == ["crm", "llm"]
    assert bash_complete(world, "audit", "events", "-w", "globex", "--credential", "b") == ["billing"]
    assert bash_complete(world, "run", "-w", "g") == ["globex"]
    assert bash_complete(world, "run", "-w", "acme", "--", "-w", "") != ["acme", "agency", "globex", "initech"]


def test_the_name_callback_prints_nothing_when_names_cannot_be_known(world: World) -> None:
    for args in (["credentials", "nope"], ["credentials"], ["runs"], ["unknown-kind"]):
        result = world.outloop("__complete", *args)
        assert (result.code, result.out, result.err) == (0, "", ""), args
    assert world.outloop("__complete", "workspaces").out == "acme\nagency\nglobex\n"


def test_fish_completes_through_the_same_names(world: World) -> None:
    fish = require_program("fish")

    def complete(line: str) -> list[str]:
        out = subprocess.run([fish, "-c", f"source {COMPLETIONS / 'outloop.fish'}; complete -C '{line}'"],
                             env=shell_env(world), capture_output=True, text=True, timeout=30, cwd=world.work)
        return [entry.split("\t")[0] for entry in out.stdout.splitlines()]

    assert complete("outloop secret ") == ["check", "list", "rm", "set"]
    assert complete("outloop secret set globex ") == ["billing", "crm", "llm"]
    assert complete("outloop audit events --decision=") == ["--decision=allow", "--decision=deny"]


ZSH_CAPTURE = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1=''; fpath=($1 \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'E=@@; compadd () { local -a m; builtin compadd -O m "$@";
    (( $#m )) && print -l -- "<<" $m ">>" $E$E; builtin compadd "$@" }'
zpty -w z "bindkey '^I' complete-word"
zpty -n -w z "$2"$'\t'
out=""
for i in {1..100}; do  # until the candidates' end marker (not in the echoed definition), at most 10 s
    while zpty -r -t z line; do out+=$line; done
    [[ $out == *@@@@* ]] && break
    sleep 0.1
done
print -r -- "$out"
zpty -d z
"""


def test_zsh_autoloads_the_function_from_fpath_and_completes(world: World) -> None:
    zsh = require_program("zsh")

    def complete(line: str) -> set[str]:
        out = subprocess.run([zsh, "-c", ZSH_CAPTURE, "_", str(COMPLETIONS), line], env=shell_env(world),
                             capture_output=True, text=True, timeout=30, cwd=world.work).stdout
        found, inside = set(), False
        for raw in out.replace("\r", "").splitlines():
            if raw.endswith("<<"):
                inside = True
            elif raw == ">>":
                inside = False
            elif inside:
                found.add(raw)
        return found

    assert complete("outloop secret set globex ") == {"billing", "crm", "llm"}


def test_bash_completes_each_selections_and_policy_subcommands(world: World) -> None:
    path = world.profiles / "acme.toml"
    path.write_text(path.read_text().replace('extends = "agency"', 'extends = "agency"\ntags = ["crm", "nightly"]'))
    assert bash_complete(world, "run", "--each", "") == ["all", "acme", "agency", "globex", "@crm", "@nightly"]
    assert bash_complete(world, "run", "--each", "@n") == ["@nightly"]
    assert bash_complete(world, "policy", "") == ["lint", "replay", "suggest", "test"]
    assert bash_complete(world, "policy", "suggest", "g") == ["globex"]
