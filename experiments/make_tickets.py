#!/usr/bin/env python3
"""A second dataset for the collapse experiments: which team should a customer-support message go to?

    python experiments/make_tickets.py --out-dir experiments/data      # tickets_train.jsonl, tickets_test.jsonl

Five labels, none shared with the bundled emotion set: billing, delivery, account, refund, technical.
Standard library only; every text is filled from the tables below, all written for this project. A
fixed seed writes byte-identical files. As in data/make_dataset.py, every 4th situation of each label
is kept for the test split only, so test messages describe problems no training message mentions;
openers, requests and closers are shared. Both splits are exactly balanced.

Label convention: the team that can fix the problem the writer describes. Refund means the writer
asks for money back for something bought; billing means a charge or invoice is wrong and no refund of
a purchase is asked for (the two are the near pair, as sadness and fear are in the emotion set).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SITUATIONS = {
    "billing": [
        "I was charged twice for this month's subscription",
        "my invoice shows a plan I never signed up for",
        "the VAT number on my invoice is wrong",
        "my card was billed on the 3rd even though the renewal date is the 15th",
        "the annual plan price went up without any notice",
        "I see a charge from you that I don't recognise",
        "the discount code was accepted but the full price was billed",
        "my company needs the invoices addressed to our head office",
        "I was billed for five seats but we only have three users",
        "the payment failed even though my card works everywhere else",
        "the currency on my bill switched from euros to dollars",
        "my receipt is missing the tax breakdown our accountant needs",
        "you keep charging the old card I removed last month",
        "the trial ended a week early and I was charged",
        "I need a copy of every invoice from last year",
        "the upgrade was prorated wrong, I paid for the full month twice",
    ],
    "delivery": [
        "my parcel has said 'out for delivery' for four days",
        "the tracking number you sent doesn't work",
        "the courier left the box at the wrong address",
        "my order was supposed to arrive on Monday and it's now Friday",
        "only two of the three items in my order arrived",
        "I need to change the delivery address before it ships",
        "the box arrived crushed and soaking wet",
        "the driver marked it delivered but nothing came",
        "my order still hasn't shipped after ten days",
        "can I pick up my order from the depot instead",
        "the delivery slot I booked was skipped without a call",
        "the package is stuck in customs",
        "the label has my old flat number on it",
        "the courier wants a signature but I'm at work all week",
        "the express shipping I paid for took as long as standard",
        "my parcel was sent back to the warehouse without trying again",
    ],
    "account": [
        "I can't log in, it says my password is wrong but I just reset it",
        "the password reset email never arrives",
        "I lost the phone with my two-factor codes",
        "someone changed the email address on my account",
        "my account got locked after a few login attempts",
        "I want to merge my two accounts into one",
        "I need to change the username on my profile",
        "please delete my account and all my data",
        "I can't add a second admin to our team account",
        "the verification code says it has expired every time",
        "I signed up with my work email and need to move to my personal one",
        "I'm getting logged out every few minutes",
        "my account says it is suspended and I don't know why",
        "I can't find where to turn off the marketing emails in my profile",
        "the login page keeps sending me back to the start",
        "I need to transfer ownership of the account to a colleague",
    ],
    "refund": [
        "I returned the jacket two weeks ago and still have no refund",
        "I want my money back for the headphones, they stopped working",
        "I cancelled within the cooling-off period, please refund me",
        "the shoes don't fit and I'd like a refund rather than an exchange",
        "you refunded the wrong amount for my returned blender",
        "the concert was cancelled, how do I get my money back",
        "I was promised a refund by your colleague last week",
        "the item was not as described and I want a full refund",
        "I sent the parcel back, it's been signed for, where's my refund",
        "I'd like to return the unopened set and get the money back",
        "the refund went to a card I no longer have",
        "half my order was missing so I want that part refunded",
        "I bought the course by mistake and haven't opened it, refund please",
        "the store credit isn't what I asked for, I want the money back",
        "my refund was approved but never showed up on my statement",
        "the lamp arrived broken and I'd rather have a refund than a new one",
    ],
    "technical": [
        "the app crashes as soon as I open the settings page",
        "exports to PDF come out blank",
        "the sync between my phone and laptop stopped working",
        "the search bar returns nothing, even for exact titles",
        "uploading a file over 10 MB fails with an error",
        "the dashboard takes over a minute to load",
        "notifications stopped arriving after the last update",
        "the calendar shows every event an hour late",
        "the integration with our spreadsheet keeps disconnecting",
        "the dark mode makes the buttons invisible",
        "the API returns a 500 error for every request since this morning",
        "images in my reports show as broken links",
        "the app freezes when I try to attach a photo",
        "the print button does nothing in the browser version",
        "saved filters disappear when I reload the page",
        "the desktop app won't start after installing the update",
    ],
}

OPENERS = ["", "Hi,", "Hello,", "Hi there.", "Good morning,", "Hey team,", "To whom it may concern,", "Quick question:"]
LEADS = ["", "", "Unfortunately ", "For some reason ", "Since yesterday ", "Again, ", "As of this week "]
REQUESTS = [
    "Can you help?", "Please sort this out.", "What should I do?", "Could someone look into it?",
    "I'd appreciate a quick reply.", "Please advise.", "How do I fix this?", "",
]
CLOSERS = ["", "Thanks.", "Thanks in advance!", "Cheers,", "Regards.", "Thank you for your help."]


def messages(label: str, situations: list[str], rng: random.Random, n: int) -> list[dict]:
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        situation = rng.choice(situations)
        lead = rng.choice(LEADS)
        body = (lead + situation) if lead else situation[0].upper() + situation[1:]
        parts = [rng.choice(OPENERS), body + rng.choice([".", ".", "!", "..."]), rng.choice(REQUESTS), rng.choice(CLOSERS)]
        text = " ".join(p for p in parts if p)
        if rng.random() < 0.15:
            text = text.lower()
        key = "".join(c for c in text.lower() if c.isalnum())
        if key not in seen:
            seen.add(key)
            rows.append({"text": text, "label": label})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="experiments/data")
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--train-per-label", type=int, default=200)
    ap.add_argument("--test-per-label", type=int, default=60)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    train, test = [], []
    for label, situations in SITUATIONS.items():
        held_out = situations[3::4]
        seen = [s for i, s in enumerate(situations) if i % 4 != 3]
        train += messages(label, seen, rng, args.train_per_label)
        test += messages(label, held_out, rng, args.test_per_label)
    rng.shuffle(train)
    rng.shuffle(test)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tickets_train.jsonl", train), ("tickets_test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} messages, {len(SITUATIONS)} labels, {len(rows) // len(SITUATIONS)} each")


if __name__ == "__main__":
    main()
