"""The one exception every start-up problem is reported with."""
from __future__ import annotations


class RecipeError(ValueError):
    """Everything wrong with a recipe (or the data it names), listed at once.

    ``problems`` holds one line per problem, each ``dotted.key: what is wrong (hint: how to fix it)``.
    Entry points print ``str(err)`` and exit non-zero before touching any output.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: " if source else ""
        head += f"{n} problem{'s' if n != 1 else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))
