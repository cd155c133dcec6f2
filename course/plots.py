"""Pictures the lessons and projects draw, in one place: matplotlib is imported inside each
function, so a program that draws nothing never pays for importing it."""

from __future__ import annotations
