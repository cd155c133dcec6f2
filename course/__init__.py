"""The course's toolbox: what every lesson needs and none of them teaches.

    ranks.py     what runs inside each rank: flags, setup and teardown, rank-prefixed printing
    launcher.py  starting ranks from outside them (notebooks, tests, checks), bounded in time
    check.py     the exercise runner: your function on N ranks, against a single-process answer
    trace.py     --trace DIR: torch.profiler on every rank, merged into one timeline

Importing this package imports no torch: a notebook kernel that only starts ranks stays light.
"""
