"""Math word problems written from templates with numbers drawn from a seeded RNG.

Each template draws its numbers, states the problem and computes the exact answer. Numbers are drawn
so that every answer is exact (whole minutes, whole cents, whole people), except the compound-interest
template, whose answer is rounded to the cent as its question asks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

NAMES = ("Amara", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena")


@dataclass(frozen=True)
class Problem:
    """One word problem and its exact answer."""

    template: str
    """Name of the template that wrote it."""
    question: str
    answer: str
    """The final answer as a person would write it (units included)."""


def _money(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


def shopping(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    notebooks, pens = rng.randint(3, 9), rng.randint(2, 12)
    notebook_price, pen_price = rng.randint(2, 9), rng.randint(1, 4)
    discount = rng.choice((10, 15, 20, 25))
    total = (notebooks * notebook_price + pens * pen_price) * 100
    question = (
        f"{name} buys {notebooks} notebooks at ${notebook_price} each and {pens} pens at ${pen_price} each. "
        f"The shop takes {discount}% off the whole purchase. How much does {name} pay?"
    )
    return Problem("shopping", question, _money(total * (100 - discount) // 100))


def train_arrival(rng: random.Random) -> Problem:
    speed = rng.choice((60, 72, 80, 96, 120))  # km/h, multiples of 4
    quarters = rng.randint(5, 22)  # travel time in quarter hours
    distance = speed * quarters // 4
    start = rng.randint(6 * 60, 14 * 60) // 5 * 5
    end = start + distance * 60 // speed
    question = (
        f"A train leaves the station at {start // 60}:{start % 60:02d} and travels {distance} km at an "
        f"average speed of {speed} km/h without stopping. At what time does it arrive?"
    )
    return Problem("train-arrival", question, f"{end // 60}:{end % 60:02d}")


def filling_pipes(rng: random.Random) -> Problem:
    while True:
        a, b = rng.sample(range(2, 13), 2)
        minutes = Fraction(60 * a * b, a + b)
        if minutes.denominator == 1:
            break
    question = (
        f"One pipe fills a water tank in {a} hours and a second pipe fills the same tank in {b} hours. "
        "If both pipes are opened together on the empty tank, how long does it take to fill it?"
    )
    hours, rest = divmod(int(minutes), 60)
    return Problem("filling-pipes", question, f"{hours} hours {rest} minutes")


def population(rng: random.Random) -> Problem:
    start = rng.randint(2, 40) * 10_000
    growth, decline = rng.randint(2, 15), rng.randint(2, 12)
    end = start * (100 + growth) * (100 - decline) // 10_000
    question = (
        f"A town had {start:,} residents. In the first year its population grew by {growth}%, and in the "
        f"second year it fell by {decline}%. How many residents does it have at the end of the second year?"
    )
    return Problem("population", question, f"{end:,}")


def recipe(rng: random.Random) -> Problem:
    servings = rng.choice((4, 8, 12))
    wanted = servings * rng.choice((3, 5, 7)) // 2  # every amount stays whole
    flour = servings * rng.randint(30, 60)
    sugar = servings * rng.randint(10, 25)
    eggs = servings // 2
    scale = Fraction(wanted, servings)
    question = (
        f"A cake recipe for {servings} servings needs {flour} g of flour, {sugar} g of sugar and "
        f"{eggs} eggs. How much of each ingredient is needed for {wanted} servings?"
    )
    answer = f"{flour * scale} g flour, {sugar * scale} g sugar, {eggs * scale} eggs"
    return Problem("recipe", question, answer)


def ages(rng: random.Random) -> Problem:
    first, second = rng.sample(NAMES, 2)
    while True:
        now_ratio = rng.randint(3, 6)
        later_ratio = rng.randint(2, now_ratio - 1)
        years = rng.randint(2, 12)
        younger = Fraction((later_ratio - 1) * years, now_ratio - later_ratio)
        if younger.denominator == 1 and 2 <= younger <= 15:
            break
    question = (
        f"{first} is {now_ratio} times as old as {second}. In {years} years, {first} will be {later_ratio} "
        f"times as old as {second}. How old are {first} and {second} now?"
    )
    return Problem("ages", question, f"{first} {now_ratio * younger}, {second} {younger}")


def test_average(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    while True:
        scores = [rng.randint(60, 95) for _ in range(rng.randint(3, 6))]
        target = rng.randint(75, 90)
        needed = target * (len(scores) + 1) - sum(scores)
        if 50 <= needed <= 100:
            break
    listed = ", ".join(map(str, scores[:-1])) + f" and {scores[-1]}"
    question = (
        f"{name} scored {listed} on the first {len(scores)} tests of the term. What score does {name} need "
        f"on the next test to bring the average of all {len(scores) + 1} tests to exactly {target}?"
    )
    return Problem("test-average", question, str(needed))


def compound_interest(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    principal = rng.randint(10, 80) * 100
    rate, years = rng.choice((2, 3, 4, 5)), rng.randint(2, 5)
    amount = Fraction(principal * 100) * Fraction(100 + rate, 100) ** years
    cents = int(amount + Fraction(1, 2))  # half up
    question = (
        f"{name} deposits ${principal:,} in a savings account that pays {rate}% interest per year, "
        f"compounded once a year. No money is added or withdrawn. How much is in the account after "
        f"{years} years, to the nearest cent?"
    )
    return Problem("compound-interest", question, _money(cents))


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    shopping,
    train_arrival,
    filling_pipes,
    population,
    recipe,
    ages,
    test_average,
    compound_interest,
)


def problems(count: int, seed: int) -> list[Problem]:
    """``count`` problems, the templates taken in turn, all numbers from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [TEMPLATES[i % len(TEMPLATES)](rng) for i in range(count)]
