"""Sign-in with Cognito, when the `cognito` context value is on: a user pool, its managed login, and the
page's app client (the CsmAuth stack, in the backend's region).

- Users sign in with their e-mail address. Self sign-up is off unless `cognito_self_sign_up` is on: an
  administrator creates users (`aws cognito-idp admin-create-user`, README), and Cognito mails them a
  temporary password. Passwords: 12 characters or more, of all four kinds. MFA is optional, with an
  authenticator app (TOTP). The Plus feature plan, with threat protection enforced: sign-ins with
  leaked credentials are blocked, risky ones challenged.
- The managed login (Cognito's sign-in pages, its own branding) at
  `https://<prefix>.auth.<region>.amazoncognito.com`; the prefix is `cognito_domain_prefix`, by default
  `csm-voice-<account id>` (unique in the region, as Cognito requires).
- The page's app client is public (no secret, so the page uses the authorization code grant with PKCE),
  asks for `openid email profile`, and returns to the page's own address (the custom domain, or the
  distribution's) and to `cognito_callback_urls`. Id and access tokens last 15 minutes (the authorizer
  checks them offline, so a token is good until it expires: kept short; the page refreshes), refresh
  tokens 12 hours; revocation is on, and sign-in errors never tell whether a user exists.

The stack comes after CsmFrontend (the callback URL is the page's address) and before CsmApi (the
authorizer accepts this pool's tokens for this client) and CsmPage (config.json tells the page where to
sign in); `SignIn` is what those two take.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Aws, CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cognito as cognito
from constructs import Construct

from csm_infra.config import Settings
from csm_infra.nag import acknowledge

# An access token stays valid at the authorizer until it expires, signed out or not: keep it short.
ACCESS_TOKEN_LIFETIME = Duration.minutes(15)
SCOPES = (cognito.OAuthScope.OPENID, cognito.OAuthScope.EMAIL, cognito.OAuthScope.PROFILE)


@dataclass(frozen=True)
class SignIn:
    """The user pool as the authorizer and the page see it."""

    user_pool_id: str
    client_id: str
    region: str
    domain_url: str  # https://<prefix>.auth.<region>.amazoncognito.com
    scopes: tuple[str, ...]

    def authorizer_environment(self) -> dict[str, str]:
        """lambda_bridge/settings.py: the authorizer accepts this pool's JWTs for this app client."""
        return {
            "COGNITO_USER_POOL_ID": self.user_pool_id,
            "COGNITO_CLIENT_ID": self.client_id,
            "COGNITO_REGION": self.region,
        }

    def page_config(self) -> dict[str, object]:
        """The `auth` section of the page's config.json (the page's code reads these names)."""
        return {"domain": self.domain_url, "clientId": self.client_id, "scopes": list(self.scopes)}


class AuthStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, settings: Settings, page_url: str, **kwargs
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.user_pool = cognito.UserPool(
            self,
            "Users",
            user_pool_name="csm-voice",
            sign_in_aliases=cognito.SignInAliases(email=True),
            auto_verify=cognito.AutoVerifiedAttrs(email=True),
            standard_attributes=cognito.StandardAttributes(
                email=cognito.StandardAttribute(required=True, mutable=True)
            ),
            self_sign_up_enabled=settings.cognito_self_sign_up,
            user_invitation=cognito.UserInvitationConfig(
                email_subject="Your CSM voice sign-in",
                email_body=(
                    f"Sign in at {page_url} as {{username}} with the temporary password {{####}} "
                    "(valid for 3 days); you will choose your own."
                ),
            ),
            password_policy=cognito.PasswordPolicy(
                min_length=12,
                require_lowercase=True,
                require_uppercase=True,
                require_digits=True,
                require_symbols=True,
                temp_password_validity=Duration.days(3),
            ),
            mfa=cognito.Mfa.OPTIONAL,
            mfa_second_factor=cognito.MfaSecondFactor(otp=True, sms=False),
            account_recovery=cognito.AccountRecovery.EMAIL_ONLY,
            feature_plan=cognito.FeaturePlan.PLUS,
            standard_threat_protection_mode=cognito.StandardThreatProtectionMode.FULL_FUNCTION,
            removal_policy=RemovalPolicy.RETAIN,  # the users; delete the pool by hand when you mean it
        )
        acknowledge(
            self.user_pool,
            "AwsSolutions-COG2",
            "MFA is offered (an authenticator app), not required: the people are invited by an "
            "administrator, and threat protection (Plus plan, enforced) blocks leaked passwords and "
            "challenges risky sign-ins.",
        )
        prefix = settings.cognito_domain_prefix or f"csm-voice-{Aws.ACCOUNT_ID}"
        self.domain = self.user_pool.add_domain(
            "Domain",
            cognito_domain=cognito.CognitoDomainOptions(domain_prefix=prefix),
            managed_login_version=cognito.ManagedLoginVersion.NEWER_MANAGED_LOGIN,
        )
        urls = [page_url, *settings.cognito_callback_urls]
        self.client = self.user_pool.add_client(
            "PageClient",
            user_pool_client_name="csm-voice-page",
            generate_secret=False,  # a public client: the page proves itself with PKCE
            auth_flows=cognito.AuthFlow(user_srp=True),
            o_auth=cognito.OAuthSettings(
                flows=cognito.OAuthFlows(authorization_code_grant=True),
                scopes=list(SCOPES),
                callback_urls=urls,
                logout_urls=urls,
            ),
            supported_identity_providers=[cognito.UserPoolClientIdentityProvider.COGNITO],
            access_token_validity=ACCESS_TOKEN_LIFETIME,
            id_token_validity=ACCESS_TOKEN_LIFETIME,
            refresh_token_validity=Duration.hours(12),
            prevent_user_existence_errors=True,
            enable_token_revocation=True,
        )
        branding = cognito.CfnManagedLoginBranding(
            self,
            "Branding",
            user_pool_id=self.user_pool.user_pool_id,
            client_id=self.client.user_pool_client_id,
            use_cognito_provided_values=True,
        )
        branding.node.add_dependency(self.domain)
        self.sign_in = SignIn(
            user_pool_id=self.user_pool.user_pool_id,
            client_id=self.client.user_pool_client_id,
            region=self.region,
            domain_url=self.domain.base_url(),
            scopes=tuple(scope.scope_name for scope in SCOPES),
        )
        CfnOutput(self, "UserPoolId", value=self.user_pool.user_pool_id, description="admin-create-user here")
        CfnOutput(self, "PageClientId", value=self.client.user_pool_client_id)
        CfnOutput(self, "SignInUrl", value=self.domain.base_url(), description="Cognito's managed login")
