"""Small helpers with one implementation each: atomic writes, JSONL, tokenizer ids, Japanese tokenisation."""
