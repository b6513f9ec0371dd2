"""Stage two: train a student against stored (or live) teacher targets by replaying the plan's views."""
