"""Test program: a lesson that needs an even world size (like lesson 06)."""
from course.ranks import EVEN, parser, print0, setup

with setup(parser(__doc__).parse_args(), EVEN) as ctx:
    print0(f"started with {ctx.world_size} ranks")
