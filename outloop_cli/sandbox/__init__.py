"""The sandbox around the loop: which layers a run gets, and the two backends that build them.

- `plan`: choose the layers for one run and the wrapper command that enforces them (what the summary states);
- `view`: the filesystem the child sees, computed as a list of mounts from the profile and the environment;
- `installation`: what the command needs in order to run at all (its interpreter, venv, outloop's own code);
- `bubblewrap`: that view and the namespaces as `bwrap` arguments;
- `namespaces` + `init`: the same with outloop's own unshare() (the fallback when bubblewrap is missing);
- `probe`: which layers this machine can give, for `outloop doctor`.

This file imports nothing: `python -m outloop_cli.sandbox.init` runs at the start of every sandboxed run.
"""
