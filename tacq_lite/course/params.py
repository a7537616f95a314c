"""Checks for a notebook's parameters cell, so a papermill run with a mistyped value stops at once.

papermill's `-p name value` passes anything it cannot read as a number or boolean as a string, and
a shell quote can add another layer: `-p quantizer '"gptq"'` arrives as the five characters `"gptq"`
with their quotes. A notebook that then writes `if quantizer == "gptq": ... else: <RTN>` runs RTN
without a word. Each notebook calls `check_choice` right after its parameters instead.
"""
from __future__ import annotations


def check_choice(name: str, value, choices) -> None:
    """Raise ValueError unless `value` is one of `choices`; the message names the fix."""
    choices = tuple(choices)
    if value in choices:
        return
    hint = ""
    if isinstance(value, str) and value.strip("\"'") in choices:
        hint = f" (it carries quotes: pass -p {name} {value.strip(chr(34) + chr(39))} without the inner quotes)"
    elif isinstance(value, str) and value.lstrip().startswith("["):
        hint = f" (a list arrived as text: pass lists with -y \"{name}: {value}\")"
    raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}{hint}.")


def check_choices(name: str, values, choices) -> None:
    """`check_choice` for every element of a list parameter; a string instead of a list is refused."""
    if isinstance(values, str):
        raise ValueError(f"{name}={values!r} is text, not a list: pass lists with -y \"{name}: [...]\" "
                         "(papermill's -p gives strings).")
    for value in values:
        check_choice(name, value, choices)
