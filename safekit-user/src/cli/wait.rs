//! `waitstart`, `waitstop`, `waitstate`: poll the daemon until the module's
//! local state is one of the wanted ones, or time out (exit 1; 64 when
//! there is no such module).

use std::time::{Duration, Instant};

use crate::{
    control::{Request, Response},
    paths::Paths,
    status::ModuleState,
};

/// Arguments of `waitstate`.
#[derive(clap::Args, Debug)]
pub struct WaitStateArgs {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Wanted states (any of): stop, wait, alone, prim, second, up.
    #[arg(required = true, value_parser = parse_state)]
    pub states: Vec<ModuleState>,
}

/// Arguments of `waitstart` / `waitstop`.
#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

fn parse_state(s: &str) -> Result<ModuleState, String> {
    ModuleState::ALL
        .into_iter()
        .find(|st| st.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("{s:?} is not a state (stop, wait, alone, prim, second, up)"))
}

/// Waits for one of `states`.
pub(super) fn wait(paths: &Paths, module: &str, states: &[ModuleState], timeout: u64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        match super::call(paths, &Request::State) {
            Ok(Response::State { status }) => match status.module(module) {
                Some(m) if states.contains(&m.state) => {
                    println!("{module}: {}", m.state);
                    return 0;
                }
                Some(_) => {}
                None => {
                    eprintln!("safekit: {}", super::no_module(module, &status));
                    return super::EXIT_USAGE;
                }
            },
            Ok(_) => {}
            Err(e) => {
                // A stopped daemon is a stopped module.
                if states.contains(&ModuleState::Stop) && super::daemon_absent(&e) {
                    println!("{module}: STOP (safekitd not running)");
                    return 0;
                }
                eprintln!("safekit: {e}");
                return 1;
            }
        }
        if Instant::now() >= deadline {
            eprintln!("safekit: {module} did not reach {states:?} within {timeout} s");
            return 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// States in which a module counts as started.
pub(super) const STARTED: [ModuleState; 4] = [
    ModuleState::Alone,
    ModuleState::Prim,
    ModuleState::Second,
    ModuleState::Up,
];
