//! Shared helpers for the qmesh end-to-end tests.
