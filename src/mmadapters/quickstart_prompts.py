"""The quickstart's text-only prompts: those of the training mixture, and the held-out ones that
`text_only_preserved` checks.

The training prompts are the hand-written `TRAINING_QUESTIONS` plus questions made from templates
(`templated_questions`); their targets are the LLM's own answers. The held-out questions share no question
with them, and most share no template: they ask about other things (art, the body, music, sport...), so the
check measures whether the LLM's text behaviour survives, not whether the mixture's answers were memorised.
"""

from __future__ import annotations

TRAINING_QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "What is 2 + 3?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "How many days are in a week?",
    "What is the opposite of hot?",
    "Which planet do we live on?",
    "What animal says moo?",
    "What is frozen water called?",
    "How many hours are in a day?",
    "What is the largest ocean?",
    "What do plants need to grow?",
    "Which season comes after winter?",
    "What is 10 minus 4?",
    "What language is spoken in Spain?",
    "How many wheels does a bicycle have?",
    "What is the color of grass?",
    "What do you call a baby cat?",
]

# (template, fillers): every filler gives one training question.
TEMPLATES = [
    (
        "What is the capital of {}?",
        [
            "Spain",
            "Portugal",
            "Canada",
            "Egypt",
            "China",
            "India",
            "Russia",
            "Greece",
            "Mexico",
            "Brazil",
            "Australia",
            "Kenya",
            "Norway",
            "Sweden",
            "Poland",
            "Ireland",
        ],
    ),
    (
        "How many legs does a {} have?",
        ["dog", "cat", "bird", "ant", "horse", "chicken", "cow", "duck", "beetle", "crab", "snake", "frog"],
    ),
    (
        "What sound does a {} make?",
        ["dog", "cat", "duck", "sheep", "lion", "owl", "pig", "horse", "frog", "snake", "bee", "crow"],
    ),
    (
        "What is the opposite of {}?",
        ["big", "up", "fast", "happy", "light", "open", "early", "wet", "young", "loud", "full", "left"],
    ),
    (
        "What color is a {}?",
        [
            "banana",
            "tomato",
            "lemon",
            "strawberry",
            "cucumber",
            "carrot",
            "cherry",
            "lime",
            "pumpkin",
            "blueberry",
            "plum",
            "coconut",
        ],
    ),
    (
        "What is the plural of {}?",
        ["mouse", "child", "box", "tooth", "foot", "city", "leaf", "man", "goose", "knife", "woman", "bus"],
    ),
    (
        "Which month comes after {}?",
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"],
    ),
    (
        "What is {}?",
        [
            "4 + 5",
            "7 + 8",
            "6 + 2",
            "9 - 3",
            "12 - 5",
            "3 + 3",
            "8 - 1",
            "5 + 6",
            "2 times 4",
            "6 times 3",
            "9 divided by 3",
            "20 minus 7",
        ],
    ),
    (
        "Who wrote {}?",
        [
            "Hamlet",
            "Romeo and Juliet",
            "Pride and Prejudice",
            "The Odyssey",
            "Don Quixote",
            "War and Peace",
            "Oliver Twist",
            "Moby Dick",
        ],
    ),
    (
        "What do you call a baby {}?",
        ["dog", "cow", "horse", "sheep", "goat", "duck", "bear", "frog", "kangaroo", "deer"],
    ),
]


def templated_questions() -> list[str]:
    """Every template with every filler, in a fixed order."""
    return [template.format(filler) for template, fillers in TEMPLATES for filler in fillers]


def training_questions() -> list[str]:
    """The text-only questions of the training mixture: hand-written first, then the templated ones."""
    return TRAINING_QUESTIONS + templated_questions()


HELD_OUT_QUESTIONS = [
    "What is the capital of Italy?",
    "How many months are in a year?",
    "What gas do humans breathe in?",
    "What is the boiling point of water in Celsius?",
    "What is the capital of Japan?",
    "How many sides does a square have?",
    "What is 3 times 3?",
    "Which animal is known as the king of the jungle?",
    "What is the first letter of the alphabet?",
    "What color do you get by mixing blue and yellow?",
    "How many continents are there?",
    "What is the chemical symbol for water?",
    "Who painted the Mona Lisa?",
    "What is the largest planet in our solar system?",
    "How many minutes are in an hour?",
    "What do caterpillars turn into?",
    "Which organ pumps blood through the body?",
    "What is the square root of 16?",
    "How many players are on a soccer team?",
    "What is the main ingredient in bread?",
    "What is the closest star to Earth?",
    "Which instrument has 88 keys?",
    "Which bird is a symbol of peace?",
    "What is the hardest natural substance?",
    "How many strings does a guitar have?",
    "What shape has three sides?",
    "What is the currency of the United States?",
    "In which direction does the sun rise?",
    "What is 100 divided by 10?",
    "Which is the longest river in the world?",
    "Which metal is liquid at room temperature?",
    "How many bones are in the human body?",
    "What do pandas eat?",
    "Which ocean lies between Europe and America?",
    "What is the smallest prime number?",
    "How many teeth does an adult human have?",
    "What is the tallest animal in the world?",
    "Which planet is known as the red planet?",
    "What do you use to write on a blackboard?",
    "How many colors are in a rainbow?",
]
