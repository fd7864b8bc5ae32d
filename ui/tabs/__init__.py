"""The page's tabs (chat, knowledge, tuning), each a `build(page, ...)` laying out its components and events."""
