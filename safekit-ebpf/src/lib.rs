#![no_std]
// Library target so that cargo can resolve the crate as a dependency of
// safekit-user (the object itself is the `safekit` bin target).
