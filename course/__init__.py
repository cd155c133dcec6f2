"""The course's toolbox: what every lesson needs and none of them teaches.

    ranks.py     what runs inside each rank: flags, setup and teardown, rank-prefixed printing
    launcher.py  starting ranks from outside them (notebooks, tests, checks), bounded in time
    check.py     the exercise runner: your function on N ranks, against a single-process answer
    trace.py     --trace DIR: torch.profiler on every rank, merged into one timeline
    header.py    lesson 02's shape handshake, the numbers its users agree on
    plots.py     the pictures lessons draw (matplotlib imported only when one is drawn)

Importing this package imports no torch: a notebook kernel that only starts ranks stays light.
"""
