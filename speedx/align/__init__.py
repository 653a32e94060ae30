"""SPEED alignment: teacher client, junior SFT, judge + DPO senior, revisor, final synthesis."""
