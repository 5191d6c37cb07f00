//! `keytally keys …`.

use std::io::Read;

use keytally::{
    BudgetStatus, Key, KeyFilter, KeyId, KeyState, KeyUpdate, NewKey, Store, Timestamp,
};
use serde_json::json;

use super::{parse, CliResult, Failure, Output};
use crate::KeysCommand;

pub fn run(store: &Store, command: &KeysCommand, out: &Output) -> CliResult {
    match command {
        KeysCommand::Create(args) => {
            let new = NewKey {
                label: args.label.clone(),
                tier: args.tier.into(),
                allowed_models: parse::models(&args.models)?,
                expires_at: args
                    .expires_in
                    .as_deref()
                    .map(|text| parse::duration(text).map(parse::from_now))
                    .transpose()?,
                rate_limit_override: args.rate_limit,
                budget: parse::budget(
                    args.budget.as_deref(),
                    args.soft_budget.as_deref(),
                    args.budget_from.as_deref(),
                    None,
                )?,
            };
            let created = store.keys().create(&new)?;
            let budget = store.keys().budget(created.key.id)?;
            out.print(
                &json!({ "key": created.key, "budget": budget, "secret": created.secret.expose() }),
                || {
                    format!(
                        "{}{}secret: {}\n(the secret is shown this once; store it now)",
                        key_text(&created.key),
                        budget_text(budget.as_ref()),
                        created.secret.expose()
                    )
                },
            );
            Ok(())
        }
        KeysCommand::List { all } => {
            let keys = all_keys(store, !*all)?;
            let now = Timestamp::now();
            // Each key with when it stops being refused for its budget.
            let listed: Vec<serde_json::Value> = keys
                .iter()
                .map(|key| {
                    key_with(
                        key,
                        &[("over_budget_until", json!(key.over_budget_until(now)))],
                    )
                })
                .collect::<CliResult<_>>()?;
            out.print(&listed, || {
                if keys.is_empty() {
                    return "no keys".to_owned();
                }
                keys.iter()
                    .map(|key| {
                        format!(
                            "{}  {:<7} {:<6} {:<11} {}\n",
                            key.id,
                            key.display_prefix,
                            key.tier.as_str(),
                            state_name(key, now),
                            key.label
                        )
                    })
                    .collect()
            });
            Ok(())
        }
        KeysCommand::Show { id } => show(store, parse::key_id(id)?, out),
        KeysCommand::Revoke { id } => {
            let key = store.keys().revoke(parse::key_id(id)?)?;
            out.print(&key, || format!("revoked {}", key.id));
            Ok(())
        }
        KeysCommand::Rotate { id, grace } => {
            let rotated = store
                .keys()
                .rotate(parse::key_id(id)?, parse::duration(grace)?)?;
            out.print(
                &json!({ "key": rotated.key, "secret": rotated.secret.expose(), "grace": grace }),
                || {
                    format!(
                        "{}secret: {}\n(the old secret keeps working for {grace}; the new one is shown this once)",
                        key_text(&rotated.key),
                        rotated.secret.expose()
                    )
                },
            );
            Ok(())
        }
        KeysCommand::Update(args) => {
            let update = KeyUpdate {
                label: args.label.clone(),
                allowed_models: args.models.as_deref().map(parse::models).transpose()?,
                expires_at: if args.no_expiry {
                    Some(None)
                } else {
                    args.expires_in
                        .as_deref()
                        .map(|text| parse::duration(text).map(|d| Some(parse::from_now(d))))
                        .transpose()?
                },
                rate_limit_override: if args.default_rate_limit {
                    Some(None)
                } else {
                    args.rate_limit.map(Some)
                },
                budget: None,
            };
            let id = parse::key_id(&args.id)?;
            let update = if args.no_budget {
                KeyUpdate {
                    budget: Some(None),
                    ..update
                }
            } else if args.budget.is_some()
                || args.soft_budget.is_some()
                || args.budget_from.is_some()
            {
                // A soft limit or a start alone changes the key's budget.
                let base = if args.budget.is_none() {
                    store.keys().budget(id)?.map(|status| status.budget)
                } else {
                    None
                };
                let budget = parse::budget(
                    args.budget.as_deref(),
                    args.soft_budget.as_deref(),
                    args.budget_from.as_deref(),
                    base,
                )?;
                KeyUpdate {
                    budget: Some(budget),
                    ..update
                }
            } else {
                update
            };
            store.keys().update(id, &update)?;
            show(store, id, out)
        }
        KeysCommand::Resolve => {
            // From stdin, never argv, where `ps` would show it.
            let input = read_secret().map_err(|source| keytally::Error::Io {
                path: "(stdin)".into(),
                source,
            })?;
            let secret = input.lines().next().unwrap_or("").trim();
            match store.keys().resolve(secret)? {
                Ok(key) => {
                    out.print(&key, || {
                        format!(
                            "id:             {}\ntier:           {}\nallowed_models: {}",
                            key.id,
                            key.tier,
                            key.allowed_models.names().join(",")
                        )
                    });
                    Ok(())
                }
                Err(rejection) => Err(Failure::Verdict {
                    message: format!("key rejected: {rejection}"),
                    json: json!({ "error": rejection.as_str() }),
                }),
            }
        }
    }
}

/// The key as JSON, with more fields.
fn key_with(key: &Key, more: &[(&str, serde_json::Value)]) -> CliResult<serde_json::Value> {
    let mut shown =
        serde_json::to_value(key).map_err(|source| keytally::Error::BadStoredValue {
            message: format!("the key cannot be shown as JSON: {source}"),
        })?;
    if let Some(fields) = shown.as_object_mut() {
        for (field, value) in more {
            fields.insert((*field).to_owned(), value.clone());
        }
    }
    Ok(shown)
}

/// Prints a key with its budget.
fn show(store: &Store, id: KeyId, out: &Output) -> CliResult {
    let key = store.keys().get(id)?;
    let budget = store.keys().budget(id)?;
    let refused_until = key.over_budget_until(Timestamp::now());
    let shown = key_with(
        &key,
        &[
            ("budget", json!(budget)),
            ("over_budget_until", json!(refused_until)),
        ],
    )?;
    out.print(&shown, || {
        format!("{}{}", key_text(&key), budget_text(budget.as_ref()))
    });
    Ok(())
}

/// The budget lines of `keys show`.
fn budget_text(budget: Option<&BudgetStatus>) -> String {
    let Some(status) = budget else {
        return "budget:         -\n".to_owned();
    };
    let soft = status.budget.soft_limit.map_or_else(
        || "-".to_owned(),
        |soft| {
            let reached = if status.soft_limit_reached {
                " (reached)"
            } else {
                ""
            };
            format!("{soft}{reached}")
        },
    );
    format!(
        "budget:         {} per {}{}\nsoft_budget:    {soft}\nspend:          {} since {}\nresets_at:      {}\n",
        status.budget.limit,
        status.budget.period,
        if status.over_budget { " (reached: the key does not resolve)" } else { "" },
        status.spend,
        status.period_start,
        status.resets_at,
    )
}

fn all_keys(store: &Store, active_only: bool) -> CliResult<Vec<Key>> {
    let mut keys = Vec::new();
    let mut filter = KeyFilter {
        state: active_only.then_some(KeyState::Active),
        limit: Some(1000),
        ..KeyFilter::default()
    };
    loop {
        let page = store.keys().list(&filter)?;
        let Some(last) = page.last() else {
            return Ok(keys);
        };
        filter.after = Some(last.id);
        keys.extend(page);
    }
}

/// The key's state at `now`, and an active key refused for its budget
/// as "over budget".
fn state_name(key: &Key, now: Timestamp) -> &'static str {
    match key.state_at(now) {
        KeyState::Active if key.over_budget_until(now).is_some() => "over budget",
        KeyState::Active => "active",
        KeyState::Revoked => "revoked",
        KeyState::Expired => "expired",
    }
}

fn key_text(key: &Key) -> String {
    let or_none = |t: Option<Timestamp>| t.map_or_else(|| "-".to_owned(), |t| t.to_string());
    format!(
        "id:             {}\nprefix:         {}\ntier:           {}\nstate:          {}\nlabel:          {}\nallowed_models: {}\nrate_limit:     {}\ncreated_at:     {}\nexpires_at:     {}\nrevoked_at:     {}\nlast_used_at:   {}\n",
        key.id,
        key.display_prefix,
        key.tier,
        state_name(key, Timestamp::now()),
        key.label,
        key.allowed_models.names().join(","),
        key.rate_limit_override
            .map_or_else(|| "default".to_owned(), |n| n.to_string()),
        key.created_at,
        or_none(key.expires_at),
        or_none(key.revoked_at),
        or_none(key.last_used_at),
    )
}

/// The secret to resolve: typed at a prompt that does not echo it when
/// stdin is a terminal, else the first line of stdin (at most 4 KiB read).
fn read_secret() -> std::io::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let mut input = String::new();
    if std::io::stdin().is_terminal() {
        // Echo goes off before the prompt shows, so nothing typed after
        // the prompt appears can be echoed.
        let _hidden = EchoOff::on_stdin()?;
        eprint!("secret (not shown): ");
        std::io::stdin().lock().take(4096).read_line(&mut input)?;
        return Ok(input);
    }
    std::io::stdin().take(4096).read_to_string(&mut input)?;
    Ok(input)
}

/// The terminal on stdin with echo off (but the final newline shown) until
/// dropped, or until a signal ends the process: SIGINT (Ctrl-C), SIGTERM
/// or SIGHUP restore the terminal first, so a shell is never left without
/// echo.
struct EchoOff {
    original: libc::termios,
    handlers: Vec<signal_hook::SigId>,
}

impl EchoOff {
    fn on_stdin() -> std::io::Result<EchoOff> {
        let mut original = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: stdin is an open terminal; tcgetattr fills the struct.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, original.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: tcgetattr succeeded, so the struct is initialised.
        let original = unsafe { original.assume_init() };
        let mut hidden = original;
        hidden.c_lflag &= !libc::ECHO;
        hidden.c_lflag |= libc::ECHONL;
        let mut handlers = Vec::new();
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler calls only tcsetattr, which POSIX lists
            // as async-signal-safe, and signal-hook's default-action
            // emulation, made for use inside a handler; `original` is a
            // copy owned by the handler.
            let registered = unsafe {
                signal_hook::low_level::register(signal, move || {
                    libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original);
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                })
            };
            handlers.push(registered?);
        }
        // SAFETY: stdin is an open terminal and `hidden` a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &hidden) } != 0 {
            let error = std::io::Error::last_os_error();
            for handler in handlers {
                signal_hook::low_level::unregister(handler);
            }
            return Err(error);
        }
        Ok(EchoOff { original, handlers })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.original) };
        for handler in self.handlers.drain(..) {
            signal_hook::low_level::unregister(handler);
        }
    }
}
