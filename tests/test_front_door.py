"""The front door: what a newcomer sees when the package cannot load its extension."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs `import fused_lstm` with a meta-path finder in front that fails the import of fused_lstm._C the way
# Python does for a module that is not there (or, with RAISE set, the way a broken build does), whether or
# not the extension is built in this checkout.
_IMPORT_WITHOUT_EXTENSION = textwrap.dedent("""
    import sys

    class HideExtension:
        def find_spec(self, name, path=None, target=None):
            if name == "fused_lstm._C":
                if RAISE:
                    raise ImportError("_C.so: undefined symbol: _ZN3c10fake")
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideExtension())
    try:
        import fused_lstm
    except ImportError as exc:
        print(f"{type(exc).__name__}: {exc}")
        sys.exit(3)
""")


def _import_without_extension(broken: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = f"RAISE = {broken}\n{_IMPORT_WITHOUT_EXTENSION}"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_unbuilt_clone_says_how_to_build() -> None:
    done = _import_without_extension(broken=False)
    assert done.returncode == 3, done.stderr
    message = done.stdout.strip()
    assert message.startswith("ImportError: fused_lstm: the C++ extension is not built: run `bash .ci/install`")
    assert "pip install --no-build-isolation -e ." in message
    assert message.endswith(f" in {REPO}")
    assert "circular import" not in message


def test_a_broken_extension_keeps_its_own_error() -> None:
    done = _import_without_extension(broken=True)
    assert done.returncode == 3, done.stderr
    assert "undefined symbol" in done.stdout and "not built" not in done.stdout
