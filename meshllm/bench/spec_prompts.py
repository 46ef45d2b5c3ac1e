"""The prompt sets of ``meshllm bench mesh --speculate``: answers that echo their prompt (rewrite,
summarise, edit code given in it), where prompt lookup drafts long runs, and open questions, where
it finds little."""

ECHO_HEAVY = (
    "Add type hints to this Python function and change nothing else. Reply with the code only.\n\n"
    "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n"
    "    return out\n",
    "Rename the variable `total` to `acc` in this code and reply with the whole code.\n\n"
    "def mean(values):\n    total = 0\n    count = 0\n    for v in values:\n        total += v\n"
    "        count += 1\n    if count == 0:\n        return 0\n    return total / count\n",
    "Fix the spelling mistakes in this paragraph and repeat it in full.\n\n"
    "The quick brown fox jumpd over the lazy dog. The dog did not wake up, becuase it was very "
    "tired after a long day of chasing cats in the garden. The fox ran away into the forrest.",
)

FREE = (
    "What are three good reasons to learn a second language?",
    "Explain in simple words why the sky is blue.",
    "Give me an idea for a short story about a lighthouse keeper.",
)

SETS = {"echo-heavy": ECHO_HEAVY, "free": FREE}
