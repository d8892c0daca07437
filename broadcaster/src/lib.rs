//! crowdsurf-broadcaster: live media in, signed chunks out.
