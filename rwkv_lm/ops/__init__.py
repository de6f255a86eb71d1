"""Custom ops: each op is a folder holding its reference, its fast paths and one dispatcher."""
