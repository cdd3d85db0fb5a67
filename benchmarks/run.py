"""Run prunekit's benchmarks: every ``benchmarks/<name>.py`` that defines ``main(argv)``.

    python benchmarks/run.py                     # all of them, default settings (what `make bench` runs)
    python benchmarks/run.py graph_speed         # only these (a name with no file is skipped)
    python benchmarks/run.py graph_speed -- --models resnet50 --repeats 5   # arguments after -- go to each

Known benchmarks run in this order: graph_speed (channel graph and removal
speed), flops_target (time to 50% FLOPs), quality (IoU / accuracy at 50%
FLOPs, --budget small by default); any other file follows in alphabetical
order. A missing benchmark is reported and skipped; one that fails does not
stop the rest, but makes the exit status 1.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRST = ["graph_speed", "flops_target", "quality"]  # known benchmarks, in this order; the rest are discovered
SKIP = {"run", "common", "mni", "quality_report"}  # run.py, what benchmarks share, data and report helpers


def available() -> list[str]:
    found = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP and not p.stem.startswith("_"))
    return [n for n in FIRST if n in found] + [n for n in found if n not in FIRST]


def load(name: str):
    path = HERE / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"prunekit_benchmarks.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    names = argv or available()
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))  # the checkout's prunekit when it is not installed
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # `import common`, as when a benchmark runs as a script
    failed = []
    for name in names:
        name = name.removesuffix(".py")
        try:
            module = load(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        if module is None or not callable(getattr(module, "main", None)):
            why = "no such file" if module is None else "no main(argv)"
            print(f"== {name}: skipped ({why})\n", flush=True)
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            status = module.main(list(passed))
        except SystemExit as exc:  # argparse errors
            status = exc.code
        except Exception:
            traceback.print_exc()
            status = 1
        print(f"== {name}: {'ok' if not status else f'failed ({status})'} in {time.perf_counter() - start:.0f} s\n",
              flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
