"""`python -m lessons.check 02`: the learner's command for checking exercises. The runner itself
lives in course/check.py; the checks of lesson NN in exercises/NN_topic.py."""

from course.check import check, main

__all__ = ["check"]

if __name__ == "__main__":
    main()
