//! First-run setup: the holder of the one-time token printed at startup creates the first (admin) operator and
//! chooses its password. There is no default account or password.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::TokenResponse;
use super::{ApiError, ApiJson, AppState, ClientIp, ErrorBody, UserAgent};
use crate::auth::setup_token_hash;
use crate::store::{NewOperator, Role};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(setup))
        .routes(routes!(accept_invitation))
}

/// The small page the printed setup link opens.
pub fn page_router() -> axum::Router<AppState> {
    axum::Router::new().route("/setup", axum::routing::get(|| async { Html(SETUP_PAGE) }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupRequest {
    /// The one-time token printed by `proxyfleet serve` on first run.
    token: String,
    username: String,
    #[schema(format = Password)]
    password: String,
}

/// Create the first operator (an admin) with the one-time setup token, and log in as them.
#[utoipa::path(post, path = "/setup", tag = "setup", request_body = SetupRequest,
    responses((status = 201, body = TokenResponse), (status = 403, body = ErrorBody, description = "token invalid, used or expired"),
              (status = 422, body = ErrorBody)))]
async fn setup(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    UserAgent(ua): UserAgent,
    ApiJson(req): ApiJson<SetupRequest>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    const REFUSED: ApiError =
        ApiError::Forbidden("setup token is invalid, already used or expired");
    let token_hash = setup_token_hash(&req.token);
    // Check the token before spending a bcrypt hash on the request.
    let now = state.auth.clock.now_ms();
    if req.token.len() > 128 || !state.store.setup_token_valid(&token_hash, now).await? {
        return Err(REFUSED);
    }
    let (name, hash) = state
        .auth
        .prepare_operator(&req.username, &req.password)
        .await?;
    let op = state
        .store
        .create_first_operator(
            &token_hash,
            NewOperator {
                username: &name,
                password_hash: &hash,
                role: Role::Admin,
                now: state.auth.clock.now_ms(),
            },
        )
        .await?
        .ok_or(REFUSED)?;
    tracing::info!(username = %op.username, %ip, "first operator created through setup");
    let issued = state
        .auth
        .sessions
        .create(&op, &ip.to_string(), &ua)
        .await
        .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(issued.into())))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvitationRequest {
    /// The `invite_token` an admin received when creating this operator.
    token: String,
    #[schema(format = Password)]
    password: String,
}

/// Accept an invitation: choose your password and log in.
#[utoipa::path(post, path = "/invitations/accept", tag = "setup", request_body = AcceptInvitationRequest,
    responses((status = 200, body = TokenResponse), (status = 403, body = ErrorBody, description = "invitation invalid, used or expired"),
              (status = 422, body = ErrorBody)))]
async fn accept_invitation(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    UserAgent(ua): UserAgent,
    ApiJson(req): ApiJson<AcceptInvitationRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    const REFUSED: ApiError = ApiError::Forbidden("invitation is invalid, already used or expired");
    let token_hash = setup_token_hash(&req.token);
    let now = state.auth.clock.now_ms();
    if req.token.len() > 128 {
        return Err(REFUSED);
    }
    let op = state
        .store
        .invitation_operator(&token_hash, now)
        .await?
        .ok_or(REFUSED)?;
    crate::auth::password::check_password(&op.username, &req.password, state.auth.composition_rule)
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let hash = state
        .auth
        .hasher
        .hash(&req.password)
        .await
        .map_err(ApiError::internal)?;
    if !state
        .store
        .accept_invitation(&token_hash, &op.id, &hash, now)
        .await?
    {
        return Err(REFUSED);
    }
    tracing::info!(username = %op.username, %ip, "invitation accepted");
    let issued = state
        .auth
        .sessions
        .create(&op, &ip.to_string(), &ua)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(issued.into()))
}

const SETUP_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>proxyfleet — first operator</title>
<style>body{font:16px system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;color:#111}
label{display:block;margin-top:1rem;font-weight:600}input{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}
button{margin-top:1.5rem;padding:.6rem 1.2rem;font-size:1rem}#msg{margin-top:1rem}.err{color:#a00000}.ok{color:#05620a}</style>
</head><body><h1>Create the first operator</h1>
<p>This account becomes the administrator. Choose your own password: at least 8 characters and at most 71 bytes,
with an uppercase letter, a lowercase letter, a digit and a special character (unless the server runs with
password_composition_rule = false), not a common password and not containing the username.</p>
<form id="f"><label for="token">Setup token</label><input id="token" name="token" required autocomplete="off">
<label for="username">Username</label><input id="username" name="username" required minlength="3" pattern="[A-Za-z0-9_]+" autocomplete="username">
<label for="password">Password</label><input id="password" name="password" type="password" required minlength="8" autocomplete="new-password">
<button type="submit">Create operator</button></form><div id="msg" role="status" aria-live="polite"></div>
<script>
const t=document.getElementById('token');let invite=false;if(location.hash.length>1){let v=decodeURIComponent(location.hash.slice(1));if(v.startsWith('invite.')){invite=true;v=v.slice(7);document.querySelector('h1').textContent='Choose your password';document.getElementById('username').closest('form').querySelector('label[for=username]').remove();document.getElementById('username').remove();}t.value=v;history.replaceState(null,'',location.pathname);}
document.getElementById('f').addEventListener('submit',async e=>{e.preventDefault();const m=document.getElementById('msg');
const pw=document.getElementById('password').value;const body=invite?{token:t.value.trim(),password:pw}:{token:t.value.trim(),username:document.getElementById('username').value,password:pw};
const r=await fetch(invite?'/api/v1.0/invitations/accept':'/api/v1.0/setup',{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify(body)});
const j=await r.json().catch(()=>({error:'unexpected response'}));
if(r.ok){m.className='ok';m.textContent=invite?'Password set. You can now log in.':'Operator created. You can now log in with this username and password.';e.target.remove();}
else{m.className='err';m.textContent=j.error||('error '+r.status);}});
</script></body></html>"#;
