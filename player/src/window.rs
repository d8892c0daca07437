//! The SDL2 window (feature `window`): video scaled to the window, sound, A/V sync by PTS, overlay.
