"""Drafting: draft trees and the sources that propose them."""
