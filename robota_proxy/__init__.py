"""Robota Remote proxy: a mountable ASGI app that holds the vendor keys."""
