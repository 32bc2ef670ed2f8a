"""RQ's side of the round-trip benchmark. RQ runs functions by reference, so its worker (a
separate ``rq worker --path <repo>`` process) imports this module."""


def noop(i):
    return i
