//! Test support for end-to-end tests.
