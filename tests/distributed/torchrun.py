"""torchrun for the tests: Debian's python3-torch 1.13 torchrun fails on Python 3.11 before it
starts any worker (Std.from_str compares an IntFlag with an int and returns None). This applies
the one-line fix to that parser and then runs the real torch.distributed.run main unchanged.
Usage: /usr/bin/python3 torchrun.py --no_python --nproc_per_node=2 flora train ..."""
import re
import sys

from torch.distributed.elastic.multiprocessing import api


def _from_str(vm):
    if re.fullmatch(r"\d", vm):
        return api.Std(int(vm))
    return {int(i): api.Std(int(v)) for i, v in (m.split(":") for m in vm.split(","))}


api.Std.from_str = classmethod(lambda cls, vm: _from_str(vm))

from torch.distributed.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
