"""Test program: a lesson that needs an even world size (like lesson 06)."""

from course.ranks import EVEN, parser, print0, setup

args = parser(__doc__).parse_args()
with setup(args, EVEN, relaunch=True, trace=args.trace) as ctx:
    print0(f"started with {ctx.world_size} ranks")
