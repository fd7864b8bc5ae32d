"""Evaluation: persona metrics per reply and the evaluate pipeline over a prompt set."""
