"""Tools for writing and reviewing policy: test a request, suggest rules from denials, replay, lint."""
